# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: model_instances
short_description: Check a host's cortex_models and plan its engine containers
version_added: 0.1.0
description:
  - Checks every entry of a host's C(cortex_models) and returns one engine
    instance per replica, with its container name, port, GPUs, image, command
    line, environment, health timeout and concurrency.
  - Every problem is reported at once, one line each, naming the model and the field.
  - The collection also has the filters C(routing_table), which merges the
    C(model_servers_endpoints) facts of several hosts into the gateway's models and replicas,
    C(instance_endpoints), the gateway's view of a host's started instances,
    C(headless_endpoints), a host's ranks without an API of models that span hosts (watched through rank 0), and
    C(model_source_files), the files (all parts of a split GGUF) that a model's source consists of,
    C(model_fetch_list), the models (not absent) and their LoRA adapters and draft models, each as an entry
    with its own C(name), C(engine) and C(source), for the role to fetch, C(model_fetch_id), what
    identifies the files of such an entry, and C(model_fetch_pending)/C(model_fetched_shapes), given the
    stamps the role left beside the files on a host, the entries to fetch and the shapes of the others,
    C(prometheus_targets), Prometheus file_sd target groups for gateways, engines and node exporters,
    C(proxy_read_timeout), the seconds nginx waits in front of the gateway (its longest timeout, over every
    model's own, and a margin), and C(fleet_rows)/C(fleet_table), the engine containers of hosts as a text
    table (playbooks/status.yml).
positional: host, gpu_count, defaults, shapes, pools
options:
  _input:
    description: The host's list of models.
    type: list
    elements: dict
    required: true
  host:
    description: The host's inventory name, for messages.
    type: str
    required: true
  gpu_count:
    description: How many GPUs the host has; C(none) when unknown.
    type: int
  defaults:
    description: The model_servers role's defaults (address, ports, images, engine settings, timeouts).
    type: dict
  shapes:
    description: >-
      Per model name, what C(cortex.serving.gguf_info) read from its file; an adapter's under
      C(MODEL+lora+ADAPTER), a draft's under C(MODEL+draft).
    type: dict
  pools:
    description: >-
      The host's C(cortex_model_pools): each pool is one instance (llama-server in router mode) that
      loads the models naming it in C(pool) on demand.
    type: list
    elements: dict
"""

EXAMPLES = r"""
- name: Show the containers this host will run
  ansible.builtin.debug:
    msg: "{{ cortex_models | cortex.serving.model_instances(inventory_hostname, 0) }}"
"""

RETURN = r"""
_value:
  description: C(host), C(instances) (one per replica) and C(absent) (models to remove).
  type: dict
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.cortex.serving.plugins.module_utils._fleet import (
    FleetError,
    fleet_rows,
    fleet_table,
    prometheus_targets,
    proxy_read_timeout,
    routing_table,
)
from ansible_collections.cortex.serving.plugins.module_utils._models import (
    ModelsError,
    fetch_id,
    fetch_list,
    fetch_pending,
    fetched_shapes,
    headless_endpoints,
    host_instances,
    instance_endpoints,
)
from ansible_collections.cortex.serving.plugins.module_utils._sources import source_files


def _model_instances(models, host, gpu_count=None, defaults=None, shapes=None, pools=None):
    try:
        return host_instances(models, host, gpu_count, defaults, shapes, pools)
    except ModelsError as exc:
        raise AnsibleFilterError(
            "cortex_models on %s has %d problem(s):\n- %s"
            % (host, len(exc.problems), "\n- ".join(exc.problems))
        ) from exc


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


def _prometheus_targets(hostvars, gateways, gpu_hosts, node_exporter_port=9100):
    """file_sd groups from the inventory: gateways' listen settings, GPU hosts' published endpoints."""
    gateway_rows = []
    for host in gateways:
        values = hostvars[host]
        gateway_rows.append(
            (
                host,
                values.get("ansible_host") or host,
                values.get("gateway_listen_host", "127.0.0.1"),
                values.get("gateway_listen_port", 8000),
            )
        )
    gpu_rows = []
    for host in gpu_hosts:
        values = hostvars[host]
        endpoints = values.get("model_servers_endpoints")
        if endpoints is None:
            raise AnsibleFilterError(
                "host %s has no model_servers_endpoints fact: run playbooks/models.yml (or site.yml) on it first"
                % host
            )
        gpu_rows.append((host, values.get("ansible_host") or host, endpoints))
    return prometheus_targets(gateway_rows, gpu_rows, node_exporter_port)


class FilterModule(object):
    def filters(self):
        return {
            "model_instances": _model_instances,
            "instance_endpoints": instance_endpoints,
            "headless_endpoints": headless_endpoints,
            "model_source_files": source_files,
            "model_fetch_list": fetch_list,
            "model_fetch_id": fetch_id,
            "model_fetch_pending": fetch_pending,
            "model_fetched_shapes": fetched_shapes,
            "routing_table": _routing_table,
            "proxy_read_timeout": proxy_read_timeout,
            "prometheus_targets": _prometheus_targets,
            "fleet_rows": fleet_rows,
            "fleet_table": fleet_table,
        }
