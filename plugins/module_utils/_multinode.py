# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vLLM models larger than one host: one engine process group over several
hosts, declared once (``multinode`` on the model, the same on each of its
hosts) and rendered per host.

Two backends:

- ``multinode`` (vLLM's own, without Ray): every host runs ``vllm serve``
  with ``--nnodes N --node-rank R --master-addr A --master-port P``; rank 0
  serves the API, the others run ``--headless``.
- ``ray``: a Ray cluster (a head on the first host, workers on the others)
  and ``vllm serve --distributed-executor-backend ray`` on the head.

The ranks talk to each other over the hosts' network (the containers share
it: torch's Gloo and NCCL open connections on ports of their own choosing),
by the addresses the inventory gives, on the interface it names.

Private to the collection.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json

MULTINODE_KEYS = ("hosts", "backend", "master_port", "interface", "env", "ray_port")
HOST_KEYS = ("host", "address")
BACKENDS = ("multinode", "ray")
DEFAULT_MASTER_PORT = 29500
DEFAULT_RAY_PORT = 6379
# The interfaces a host's facts list that never carry a model's traffic.
_NOT_CLUSTER = ("lo", "docker", "br-", "veth", "virbr", "cni", "flannel", "cali", "vxlan", "tun", "nft")


def multinode_of(model):
    section = model.get("multinode") if isinstance(model, dict) else None
    return section if isinstance(section, dict) else None


def _whole(value, least=1):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def cluster_interfaces(interfaces):
    """The interfaces of a host's facts that could carry cluster traffic."""
    return sorted(i for i in interfaces or [] if not str(i).startswith(_NOT_CLUSTER))


def check_multinode(model, host, problems, interfaces=None):
    """The problems of a model's ``multinode`` section, seen from ``host``.

    Returns ``{rank, nnodes, hosts, master_addr, address, ...}`` for this host,
    or None when the section is unusable. ``interfaces`` are the host's
    network interfaces (its facts), when known.
    """
    name = model.get("name")
    spec = model.get("multinode")
    where = "model %s: multinode" % name
    if not isinstance(spec, dict):
        problems.append("%s: must be a mapping with hosts (and backend, master_port, interface)" % where)
        return None
    unknown = sorted(set(spec) - set(MULTINODE_KEYS))
    if unknown:
        problems.append(
            "%s.%s: not a multinode setting (known: %s)" % (where, unknown[0], ", ".join(MULTINODE_KEYS))
        )
    if model.get("engine") != "vllm":
        problems.append(
            "%s: only vLLM models span hosts (this one runs on %s)" % (where, model.get("engine"))
        )
    backend = spec.get("backend", "multinode")
    if backend not in BACKENDS:
        problems.append("%s.backend: must be one of %s, got %r" % (where, ", ".join(BACKENDS), backend))
    hosts = spec.get("hosts")
    if not isinstance(hosts, list) or len(hosts) < 2:
        problems.append(
            "%s.hosts: list the model's hosts in rank order, two or more, each {host, address}" % where
        )
        return None
    names = []
    for position, entry in enumerate(hosts):
        at = "%s.hosts[%d]" % (where, position)
        if not isinstance(entry, dict) or not entry.get("host") or not entry.get("address"):
            problems.append(
                "%s: give host (its inventory name) and address (where the other hosts reach it)" % at
            )
            return None
        extra = sorted(set(entry) - set(HOST_KEYS))
        if extra:
            problems.append("%s.%s: not a host setting (known: host, address)" % (at, extra[0]))
        names.append(str(entry["host"]))
    if len(set(names)) != len(names):
        problems.append("%s.hosts: a host is listed twice (%s)" % (where, ", ".join(names)))
    if len(set(str(e["address"]) for e in hosts)) != len(hosts):
        problems.append("%s.hosts: two hosts have the same address" % where)
    for key, default in (("master_port", DEFAULT_MASTER_PORT), ("ray_port", DEFAULT_RAY_PORT)):
        port = spec.get(key, default)
        if not _whole(port) or port > 65535:
            problems.append("%s.%s: must be a port number (1-65535), got %r" % (where, key, port))
    env = spec.get("env") or {}
    if not isinstance(env, dict):
        problems.append("%s.env: must be a mapping of names to values (NCCL_IB_HCA and the like)" % where)
    if host not in names:
        problems.append(
            "%s.hosts: %s serves the model but is not one of its hosts (%s)" % (where, host, ", ".join(names))
        )
        return None
    interface = spec.get("interface")
    if interface is not None and (not isinstance(interface, str) or not interface):
        problems.append("%s.interface: the name of a network interface, got %r" % (where, interface))
        interface = None
    if interfaces is not None:
        usable = cluster_interfaces(interfaces)
        if interface is None and len(usable) > 1:
            problems.append(
                "%s.interface: %s has several network interfaces (%s); name the one the model's hosts "
                "talk over" % (where, host, ", ".join(usable))
            )
        elif interface is not None and interface not in interfaces:
            problems.append(
                "%s.interface: %s has no interface %s (it has %s)"
                % (where, host, interface, ", ".join(sorted(interfaces)))
            )
        elif interface is None and len(usable) == 1:
            interface = usable[0]
    rank = names.index(host)
    return {
        "rank": rank,
        "nnodes": len(names),
        "hosts": names,
        "addresses": [str(e["address"]) for e in hosts],
        "address": str(hosts[rank]["address"]),
        "master_addr": str(hosts[0]["address"]),
        "master_port": int(spec.get("master_port", DEFAULT_MASTER_PORT)),
        "ray_port": int(spec.get("ray_port", DEFAULT_RAY_PORT)),
        "backend": backend,
        "interface": interface,
        "env": dict((str(k), str(v)) for k, v in (env.items() if isinstance(env, dict) else [])),
    }


def check_layout(name, tensor, pipeline, nnodes, gpus_per_host, hf_config, problems):
    """The parallel layout divides the model, and the hosts' GPUs hold it."""
    world = tensor * pipeline
    if gpus_per_host:
        if world != gpus_per_host * nnodes:
            problems.append(
                "model %s: vllm.tensor_parallel_size: %d x pipeline_parallel_size %d = %d ranks, but %d hosts "
                "with %d GPU(s) each have %d"
                % (name, tensor, pipeline, world, nnodes, gpus_per_host, gpus_per_host * nnodes)
            )
    elif world != nnodes:
        problems.append(
            "model %s: vllm.tensor_parallel_size: on CPUs each host runs one rank: %d x %d = %d ranks for %d hosts"
            % (name, tensor, pipeline, world, nnodes)
        )
    text = (hf_config or {}).get("text_config") or hf_config or {}
    layers = text.get("num_hidden_layers")
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    if layers and pipeline > int(layers):
        problems.append(
            "model %s: vllm.pipeline_parallel_size: %d stages for %d layers" % (name, pipeline, int(layers))
        )
    if heads and int(heads) % tensor:
        problems.append(
            "model %s: vllm.tensor_parallel_size: %d ranks do not divide the %d attention heads"
            % (name, tensor, int(heads))
        )
    if kv_heads and int(kv_heads) % tensor and tensor % int(kv_heads):
        problems.append(
            "model %s: vllm.tensor_parallel_size: %d ranks and %d KV heads: one must divide the other"
            % (name, tensor, int(kv_heads))
        )


def multinode_args(node):
    """The ``vllm serve`` flags of this host's rank (after the model's own)."""
    if node["backend"] == "ray":
        # Ray places the workers; only the head runs vllm serve.
        return ["--distributed-executor-backend", "ray"]
    args = [
        "--distributed-executor-backend", "mp",
        "--nnodes", str(node["nnodes"]),
        "--node-rank", str(node["rank"]),
        "--master-addr", node["master_addr"],
        "--master-port", str(node["master_port"]),
    ]  # fmt: skip
    if node["rank"]:
        # No API here: rank 0 serves it for the whole group.
        args.append("--headless")
    return args


def multinode_env(node):
    """The environment of this host's rank: which address and interface the
    group's traffic uses, and the operator's own (InfiniBand) settings."""
    env = {"VLLM_HOST_IP": node["address"]}
    if node["interface"]:
        env.update(GLOO_SOCKET_IFNAME=node["interface"], NCCL_SOCKET_IFNAME=node["interface"])
    env.update(node["env"])
    return env


def ray_commands(node):
    """The Ray node of this host (``ray start``, blocking), for the ray backend."""
    if node["rank"] == 0:
        return [
            "ray",
            "start",
            "--head",
            "--node-ip-address",
            node["address"],
            "--port",
            str(node["ray_port"]),
            "--block",
        ]
    return [
        "ray", "start", "--address", "%s:%d" % (node["master_addr"], node["ray_port"]),
        "--node-ip-address", node["address"], "--block",
    ]  # fmt: skip


# A model's keys that never reach a rank's container: the gateway's routing
# and timeouts, the desired state, and the restart policy (a rank is never
# restarted alone: its policy is always "no").
NOT_RANK_KEYS = frozenset(("state", "routing", "timeouts", "restart_policy"))


def group_id(model):
    """One identity for every rank of the group: a change to what reaches any
    rank replaces every rank, so no rank is left in an old group; a change of
    the gateway's settings alone leaves the group running."""
    kept = dict((k, v) for k, v in model.items() if k not in NOT_RANK_KEYS)
    if isinstance(kept.get("source"), dict):
        kept["source"] = dict((k, v) for k, v in kept["source"].items() if k != "token")
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()  # noqa: S324 - an identity, not a secret
