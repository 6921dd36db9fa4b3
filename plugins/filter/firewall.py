# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: engine_firewall_rules
short_description: Plan the host firewall that keeps engine ports to the gateway hosts
version_added: 0.1.0
description:
  - From the address the engines are published on, the inventory's models and port range, and the
    hosts allowed to reach them, returns what the C(engine_firewall) role writes into its nftables table.
  - Every host of the allowed groups must have an IP address (C(engine_firewall_address), else
    C(ansible_host)); every problem is reported at once, naming the host or value, before any host changes.
positional: models, port_base, port_span, hostvars, groups, allow_groups, allow, enabled, pools, host
options:
  _input:
    description: The address the engines' ports are published on (C(model_servers_bind_address)).
    type: str
    required: true
  models:
    description: The host's C(cortex_models) list; explicit C(port)s outside the range are guarded too.
    type: list
    elements: dict
    required: true
  port_base:
    description: First port of the automatic engine port range.
    type: int
    required: true
  port_span:
    description: Size of the automatic engine port range.
    type: int
    required: true
  hostvars:
    description: C(hostvars).
    type: dict
    required: true
  groups:
    description: C(groups).
    type: dict
    required: true
  allow_groups:
    description: Groups whose hosts may reach the engine ports.
    type: list
    elements: str
    required: true
  allow:
    description: Further addresses or CIDR networks that may reach the engine ports.
    type: list
    elements: str
    required: true
  enabled:
    description: C(auto) (on unless the engines are published on loopback), C(true) or C(false).
    type: raw
    default: auto
  pools:
    description: The host's C(cortex_model_pools) list; a pool's explicit C(port) outside the range is guarded too.
    type: list
    elements: dict
    default: []
  host:
    description:
      - The host's inventory name. The ports of a model over several hosts with this host among them (the
        ranks listen on every address) are guarded too, open to the group's own hosts only.
    type: str
"""

EXAMPLES = r"""
- name: Plan the engine firewall
  ansible.builtin.set_fact:
    _rules: >-
      {{ model_servers_bind_address | cortex.serving.engine_firewall_rules(cortex_models, 18080, 2000,
         hostvars, groups, ['gateways'], ['10.20.0.90']) }}
"""

RETURN = r"""
_value:
  description: The plan.
  type: dict
  contains:
    active:
      description: Whether the host gets the ruleset.
      type: bool
    engines:
      description: Whether the engine ports are guarded (the engines are published beyond loopback, or C(enabled) is true).
      type: bool
    groups:
      description:
        - One entry per model over several hosts with this host among them, C(enabled) being anything but false.
        - Each has C(model), C(family), C(daddr) (the address the group reaches this host on), C(ports) (the
          master port, NCCL's and Gloo's ephemeral range, and Ray's ports for the ray backend) and C(peers)
          (the group's addresses, the only sources let in).
      type: list
      elements: dict
    family:
      description: C(ip) or C(ip6), the published address's family.
      type: str
    daddr:
      description: The published address, or null when the engines are published on every address.
      type: str
    ports:
      description: Port intervals to guard, as nft writes them (C(18080-20079)).
      type: list
      elements: str
    ipv4:
      description: IPv4 addresses and networks allowed in.
      type: list
      elements: str
    ipv6:
      description: IPv6 addresses and networks allowed in.
      type: list
      elements: str
"""

from ansible.errors import AnsibleFilterError
from ansible_collections.cortex.serving.plugins.module_utils._firewall import (
    FirewallError,
    engine_ports,
    firewall_rules,
    group_guards,
)


def _engine_firewall_rules(
    bind_address,
    models,
    port_base,
    port_span,
    hostvars,
    groups,
    allow_groups,
    allow,
    enabled="auto",
    pools=None,
    host=None,
):
    # A group the inventory lacks allows no one (an inventory without gateways).
    sources = []
    for group in allow_groups:
        for member in groups.get(group, []):
            values = hostvars[member]
            sources.append(
                (member, values.get("engine_firewall_address") or values.get("ansible_host") or member)
            )
    try:
        return firewall_rules(
            bind_address,
            sources,
            allow,
            engine_ports(models, port_base, port_span, pools),
            enabled,
            group_guards(models, host),
        )
    except FirewallError as exc:
        raise AnsibleFilterError(
            "engine firewall: %d problem(s):\n- %s" % (len(exc.args[0]), "\n- ".join(exc.args[0]))
        ) from exc


class FilterModule(object):
    def filters(self):
        return {"engine_firewall_rules": _engine_firewall_rules}
