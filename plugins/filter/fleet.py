# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: model_endpoints
short_description: The engine endpoints a host's cortex_models list gives
version_added: 0.1.0
description:
  - One endpoint per model (name, engine, port, url, max_concurrency); a model
    without C(port) gets I(port_base) plus its index in the list.
  - The collection also has the filter C(routing_table), which merges the
    endpoints of several hosts into the gateway's models and replicas.
positional: address, port_base, llamacpp_defaults
options:
  _input:
    description: The host's list of models.
    type: list
    elements: dict
    required: true
  address:
    description: Address the host publishes engine ports on.
    type: str
    required: true
  port_base:
    description: First automatic port.
    type: int
    required: true
  llamacpp_defaults:
    description: llama.cpp defaults, for each model's C(parallel) slots.
    type: dict
"""

EXAMPLES = r"""
- name: Show the endpoints of this host
  ansible.builtin.debug:
    msg: "{{ cortex_models | cortex.serving.model_endpoints('127.0.0.1', 18080) }}"
"""

RETURN = r"""
_value:
  description: The endpoints.
  type: list
  elements: dict
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.cortex.serving.plugins.module_utils._fleet import (
    FleetError,
    model_endpoints,
    routing_table,
)


def _routing_table(hosts, hostvars, fact="model_servers_endpoints"):
    pairs = []
    for host in hosts:
        endpoints = hostvars[host].get(fact)
        if endpoints is None:
            raise AnsibleFilterError(
                "host %s has no %s fact: run playbooks/models.yml (or site.yml) on it first" % (host, fact)
            )
        pairs.append((host, endpoints))
    try:
        return routing_table(pairs)
    except FleetError as exc:
        raise AnsibleFilterError(str(exc)) from exc


class FilterModule(object):
    def filters(self):
        return {"model_endpoints": model_endpoints, "routing_table": _routing_table}
