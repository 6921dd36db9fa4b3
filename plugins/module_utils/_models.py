# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A host's ``cortex_models`` list turned into checked engine instances.

This is the one place that decides, for each model on a host, its replicas,
their containers, ports, GPUs, engine command lines, health timeouts and
concurrency. The validation play calls it (through the ``model_instances``
filter) before any host changes, so every mistake it finds is reported at
once, each line naming the model and the field. The model_servers role then
deploys exactly what it returned, and the gateway routes to the same list.

Private to the collection: filters, modules and tests are its only users.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import ipaddress
import json
import re
import zlib
from collections import namedtuple

from ansible_collections.cortex.serving.plugins.module_utils._engine_command import (
    API_KEY_FILE,
    LLAMACPP_PORT,
    VLLM_ENTRYPOINT,
    VLLM_PORT,
    VLLM_VENV_DIR,
    EngineCommandError,
    llamacpp_command,
    vllm_command,
)
from ansible_collections.cortex.serving.plugins.module_utils._features import (
    NAME,
    adapters_of,
    check_features,
    check_vocabularies,
    draft_fetch_name,
    feature_files,
)
from ansible_collections.cortex.serving.plugins.module_utils._multinode import (
    check_layout,
    check_multinode,
    group_id,
    multinode_args,
    multinode_env,
    ray_commands,
)
from ansible_collections.cortex.serving.plugins.module_utils._pools import (
    PRESET_FILE,
    check_member,
    check_pool,
    member_model_file,
    misplaced_member_keys,
    pool_of,
    preset_section,
    preset_text,
    router_command,
)
from ansible_collections.cortex.serving.plugins.module_utils._sources import (
    SOURCE_KINDS,
    source_file_name,
    source_kind,
)

ENGINES = ("llamacpp", "vllm")
STATES = ("started", "stopped", "absent")
RESTART_POLICIES = ("no", "on-failure", "always", "unless-stopped")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
STOP_TIMEOUTS = {"llamacpp": 15, "vllm": 60}
# A model folder for vLLM can come as one of these archives (source.url).
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_MIB = 1024 * 1024
_GIB = 1024 * _MIB

# vLLM on CPUs, compiling: its cache in an in-memory folder it may execute from.
COMPILE_DIR = "/var/cache/cortex-compile"
# Owned by the engine's user: a tmpfs "mode" is lost when Docker starts the
# container again (seen: the folder came back root's 0755), its uid is not.
COMPILE_TMPFS = COMPILE_DIR + ":exec,uid=%d,gid=%d"
COMPILE_ENV = {"VLLM_CACHE_ROOT": COMPILE_DIR + "/vllm"}

# What each engine needs from the role when the inventory says nothing.
BUILTIN_DEFAULTS = {
    "address": "127.0.0.1",
    "port_base": 18080,
    "port_span": 2000,
    "container_prefix": "cortex-",
    "restart_policy": "unless-stopped",
    # vllm_cpu: the CPU image (images/vllm-cpu), for vLLM models without GPUs.
    "images": {
        "llamacpp": "cortex/llamacpp-server:0c1e570-cpu",
        "vllm": "vllm/vllm-openai:v0.33.0",
        "vllm_cpu": "cortex/vllm-cpu:0.32.0",
    },
    # A host folder holding the vLLM virtualenv, mounted read-only into CPU
    # vLLM containers whose image does not carry it (empty: the image has it).
    "vllm_cpu_venv": "",
    # Where the role puts each model's (and adapter's, and draft's) files on the host.
    "models_dir": "/var/lib/cortex/models",
    # Environment of vLLM models without GPUs, under the model's own env.
    "vllm_cpu_env": {},
    "llamacpp": {"parallel": 2, "metrics": True},
    # Applied over "llamacpp" to instances that have GPUs (see docs/llamacpp-tuning.md).
    "llamacpp_gpu": {"n_gpu_layers": 999},
    # And over that, to instances split across two or more GPUs: tensor
    # parallelism, measured fastest on two H200s (docs/llamacpp-tuning.md).
    "llamacpp_multi_gpu": {"split_mode": "tensor"},
    "vllm": {},
    # Applied over "vllm" to instances with GPUs, and to those without.
    "vllm_gpu": {},
    "vllm_cpu": {},
    # Start periods: a base plus a rate per GiB of model, per engine. vLLM
    # also profiles memory and captures CUDA graphs before it answers.
    "health_timeout": {"llamacpp": [120, 30], "vllm": [600, 60]},
    "default_context": 4096,
    # The user id the engines run as (the role's model_servers_engine_uid).
    "engine_uid": 10001,
}


class ModelsError(ValueError):
    """One or more model entries are wrong; ``problems`` has one line each."""

    def __init__(self, problems):
        self.problems = list(problems)
        super(ModelsError, self).__init__("\n".join(self.problems))


def _merge(base, override):
    merged = dict(base or {})
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_archive(name):
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_source(name, engine, source, problems, where=None):
    where = where or "model %s: source" % name
    if not isinstance(source, dict):
        problems.append("%s: must be a mapping with one of %s" % (where, ", ".join(SOURCE_KINDS)))
        return
    given = [kind for kind in SOURCE_KINDS if source.get(kind)]
    if len(given) != 1:
        problems.append(
            "%s: give exactly one of %s (got %s)"
            % (where, ", ".join(SOURCE_KINDS), ", ".join(given) or "none")
        )
        return
    kind = given[0]
    if kind == "wheel" and not source.get("member"):
        problems.append(
            "%s.member: required with source.wheel (the model file's path inside the wheel)" % where
        )
    if kind == "path" and not str(source["path"]).startswith("/"):
        problems.append("%s.path: must be an absolute path on the host, got %r" % (where, source["path"]))
    if kind == "url":
        url = str(source["url"])
        if not re.match(r"^(https?|file)://", url):
            problems.append("%s.url: must be an http(s):// or file:// URL, got %r" % (where, url))
        if not source.get("sha256"):
            problems.append(
                "%s.sha256: required with source.url, so a changed or corrupted download is refused" % where
            )
        elif not _SHA256.match(str(source["sha256"])):
            problems.append("%s.sha256: must be 64 hex digits, got %r" % (where, source["sha256"]))
        if engine == "vllm" and not _is_archive(source_file_name(source) or ""):
            problems.append(
                "%s.url: vLLM loads a model folder; give an archive of one (%s), or use source.hf_repo, "
                "path or wheel" % (where, ", ".join(ARCHIVE_SUFFIXES))
            )
    if kind == "hf_repo":
        if not re.match(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", str(source["hf_repo"])):
            problems.append("%s.hf_repo: must look like owner/name, got %r" % (where, source["hf_repo"]))
        if engine == "llamacpp" and not source.get("file"):
            problems.append(
                "%s.file: llama.cpp needs the GGUF file's name inside %s" % (where, source["hf_repo"])
            )
    file_name = source_file_name(source)
    if engine == "llamacpp" and file_name and not file_name.lower().endswith(".gguf"):
        problems.append(
            "%s: llama.cpp serves GGUF files only, and %s is not one (no .gguf suffix)" % (where, file_name)
        )
    if engine == "vllm" and file_name and file_name.lower().endswith(".gguf"):
        problems.append(
            "%s: %s is a GGUF file; serve GGUF with engine llamacpp, and give vLLM a model "
            "repository or directory" % (where, file_name)
        )


def _replica_gpus(name, gpus, replicas, problems):
    """Split a model's ``gpus`` into per-replica explicit lists or counts."""
    if gpus is None or gpus == []:
        return [[] for _replica in range(replicas)], None
    if _is_int(gpus):
        if gpus < 0:
            problems.append("model %s: gpus: a GPU count must be 0 or more, got %d" % (name, gpus))
            return [[] for _replica in range(replicas)], None
        return [None] * replicas, gpus
    if not isinstance(gpus, list) or not all(_is_int(g) and g >= 0 for g in gpus):
        problems.append(
            "model %s: gpus: give a list of GPU indices (like [0, 1]) or a count, got %r" % (name, gpus)
        )
        return [[] for _replica in range(replicas)], None
    if len(set(gpus)) != len(gpus):
        problems.append("model %s: gpus: GPU indices repeat in %r" % (name, gpus))
    if len(gpus) % replicas:
        problems.append(
            "model %s: gpus: %d GPU indices cannot be split evenly over %d replicas"
            % (name, len(gpus), replicas)
        )
        return [[] for _replica in range(replicas)], None
    per = len(gpus) // replicas
    return [list(gpus[i * per : (i + 1) * per]) for i in range(replicas)], None


def _auto_port(key, base, span, taken):
    start = zlib.crc32(key.encode("utf-8")) % span
    for step in range(span):
        port = base + (start + step) % span
        if port not in taken:
            return port
    raise ModelsError(["no free automatic port left in %d-%d" % (base, base + span - 1)])


def _health_timeout(engine, model, size_bytes, defaults):
    if model.get("health_timeout") is not None:
        return int(model["health_timeout"])
    base, per_gib = defaults["health_timeout"][engine]
    gib = float(size_bytes or 0) / _GIB
    return int(base + per_gib * gib)


# One model entry once checked (or a pool, as one llama.cpp entry): what the
# later steps of host_instances place and build. per_replica holds each
# replica's explicit GPU indices (None: none given), count the GPUs per
# replica a model asked for by number (None: by index, or none).
_Checked = namedtuple(
    "_Checked",
    "model name engine state restart replicas port per_replica count fraction env",
)


class _HostPlan(object):
    """What the steps of host_instances share while they check one host."""

    def __init__(self, host, cfg, shapes):
        self.host = host
        self.cfg = cfg
        self.shapes = shapes
        self.problems = []
        self.absent = []
        # Pool name -> its entry; per pool, its models' entries in list order.
        self.pools = {}
        self.members = {}
        # Model name -> its position in cortex_models.
        self.seen = {}
        # Every name a client can ask for on this host: models and their adapters.
        self.served_names = {}
        # Per model that spans hosts: this host's place in its group (_multinode).
        self.spans = {}
        self.checked = []
        # Host port -> what listens there.
        self.taken = {}


def host_instances(models, host="host", gpu_count=None, defaults=None, shapes=None, pools=None):
    """Check a host's models and return its engine instances, one per replica.

    ``gpu_count`` is the number of GPUs the host has (None when unknown, as in
    a check before facts). ``shapes`` maps a model name to what gguf_info read
    from its file (context_length, size_bytes), when it is known. ``pools`` is
    the host's ``cortex_model_pools``: each pool is one instance, whose models
    (those naming it in ``pool``) are loaded when asked for.

    Returns ``{"instances": [...], "absent": [model names], "host": host}``.
    Raises ModelsError listing every problem found.

    The steps, in order: the pools declared; each model entry; the pools with
    their members; names served twice; GPUs; ports; then each instance built.
    """
    plan = _HostPlan(host, _merge(BUILTIN_DEFAULTS, defaults), shapes or {})
    models = _as_list(models, "cortex_models", "model entries", host)
    _check_pools(plan, _as_list(pools, "cortex_model_pools", "pools", host))
    for position, model in enumerate(models):
        _check_model(plan, position, model)
    _check_pool_entries(plan)
    _check_served_names(plan)
    _place_gpus(plan, gpu_count)
    _claim_explicit_ports(plan)
    instances = _build_instances(plan)
    if plan.problems:
        raise ModelsError(plan.problems)
    return {"host": host, "instances": instances, "absent": plan.absent}


def _as_list(value, variable, what, host):
    """A list variable that may be left out (None: empty); anything else stops the check."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ModelsError(
            ["%s on %s: must be a list of %s, got %s" % (variable, host, what, type(value).__name__)]
        )
    return value


def _check_pools(plan, pools):
    """Step 1: the declared pools, by name (their members come with the models)."""
    for position, pool in enumerate(pools):
        pool_name = check_pool(pool, position, plan.host, plan.problems)
        if pool_name is None:
            continue
        if pool_name in plan.pools:
            plan.problems.append("pool %s: name: declared twice on %s" % (pool_name, plan.host))
        elif not NAME.match(pool_name):
            plan.problems.append(
                "pool %s: name: use letters, digits, '.', '_' and '-' (at most 63, starting with a letter or digit)"
                % pool_name
            )
        plan.pools[pool_name] = pool
    plan.members = dict((pool_name, []) for pool_name in plan.pools)


def _check_model(plan, position, model):
    """Step 2: one entry of cortex_models: its name and engine, its common
    fields, then either its pool membership or its own features and GPUs."""
    name = _check_model_name(plan, position, model)
    if name is None:
        return
    engine = model.get("engine")
    if engine not in ENGINES:
        plan.problems.append(
            "model %s: engine: must be one of %s, got %r" % (name, ", ".join(ENGINES), engine)
        )
        return
    fields = _check_model_fields(plan, name, engine, model)
    _check_source(name, engine, model.get("source"), plan.problems)
    if pool_of(model) is not None or "pool" in model:
        _check_pool_member(plan, name, engine, model, fields["state"])
        return
    _check_own_model(plan, name, engine, model, fields)


def _check_model_name(plan, position, model):
    """The entry's served name, once per host (None: the entry is not checked further)."""
    if not isinstance(model, dict):
        plan.problems.append(
            "cortex_models[%d] on %s: must be a mapping, got %r" % (position, plan.host, model)
        )
        return None
    name = model.get("name")
    if not name or not isinstance(name, str):
        plan.problems.append(
            "cortex_models[%d] on %s: name: required (the served model name)" % (position, plan.host)
        )
        return None
    if not NAME.match(name):
        plan.problems.append(
            "model %s: name: use letters, digits, '.', '_' and '-' (at most 63, starting with a letter or digit)"
            % name
        )
    if name in plan.seen:
        plan.problems.append(
            "model %s: name: declared twice on %s (entries %d and %d)"
            % (name, plan.host, plan.seen[name], position)
        )
        return None
    plan.seen[name] = position
    plan.served_names.setdefault(name, []).append("a model")
    return name


def _check_model_fields(plan, name, engine, model):
    """The fields every model has: each bad one reported, and replaced by a
    value that lets the later steps go on (so all problems come at once)."""
    problems = plan.problems
    other = [e for e in ENGINES if e != engine and model.get(e)]
    if other:
        problems.append(
            "model %s: %s: settings for engine %s, but the model runs on %s"
            % (name, other[0], other[0], engine)
        )
    state = model.get("state", "started")
    if state not in STATES:
        problems.append("model %s: state: must be one of %s, got %r" % (name, ", ".join(STATES), state))
    restart = model.get("restart_policy", plan.cfg["restart_policy"])
    if restart not in RESTART_POLICIES:
        problems.append(
            "model %s: restart_policy: must be one of %s, got %r"
            % (name, ", ".join(RESTART_POLICIES), restart)
        )
    replicas = model.get("replicas", 1)
    if not _is_int(replicas) or replicas < 1:
        problems.append("model %s: replicas: must be a whole number of 1 or more, got %r" % (name, replicas))
        replicas = 1
    port = model.get("port")
    if port is not None and (not _is_int(port) or not 1 <= port <= 65535 - replicas + 1):
        problems.append("model %s: port: must be a port number (1-65535), got %r" % (name, port))
        port = None
    fraction = model.get("gpu_memory_fraction")
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1
    ):
        problems.append(
            "model %s: gpu_memory_fraction: must be a number in (0, 1], got %r" % (name, fraction)
        )
        fraction = None
    env = model.get("env") or {}
    if not isinstance(env, dict):
        problems.append("model %s: env: must be a mapping of names to values" % name)
        env = {}
    return {
        "state": state,
        "restart": restart,
        "replicas": replicas,
        "port": port,
        "fraction": fraction,
        "env": env,
    }


def _source_checker(plan, name, engine):
    """How check_features checks an adapter's or a draft's source."""
    return lambda where, source: _check_source(name, engine, source, plan.problems, where)


def _check_pool_member(plan, name, engine, model, state):
    """A model served by a pool: its pool exists, its features fit one; it
    is placed with its pool (step 3), not on its own."""
    check_member(model, plan.pools, plan.problems)
    check_features(model, engine, _source_checker(plan, name, engine), plan.problems)
    for adapter in adapters_of(model):
        if isinstance(adapter, dict) and adapter.get("name"):
            plan.served_names.setdefault(adapter["name"], []).append("an adapter of %s" % name)
    if state == "absent":
        plan.absent.append(name)
    elif pool_of(model) in plan.members:
        plan.members[pool_of(model)].append(model)


def _check_own_model(plan, name, engine, model, fields):
    """A model with containers of its own: its group (spanning hosts), its
    replicas' GPUs, its adapters and draft; then it joins the checked list."""
    problems = plan.problems
    if model.get("multinode") is not None:
        node = check_multinode(model, plan.host, problems, plan.cfg.get("interfaces"))
        if model.get("replicas", 1) != 1:
            problems.append(
                "model %s: replicas: a model that spans hosts runs one rank per host; "
                "give it more hosts or GPUs instead" % name
            )
        if node is not None:
            plan.spans[name] = node
    for key in misplaced_member_keys(model):
        problems.append("model %s: %s: a setting of a model in a pool; this model has no pool" % (name, key))
    state, replicas = fields["state"], fields["replicas"]
    per_replica, count = [None], None
    if state != "absent":
        per_replica, count = _replica_gpus(name, model.get("gpus"), replicas, problems)
    # Each replica's GPUs (None: none, or not known), for the draft's devices.
    replica_gpus = count if count is not None else len(per_replica[0] or []) or None
    for adapter_name in check_features(
        model, engine, _source_checker(plan, name, engine), problems, replica_gpus
    ):
        plan.served_names.setdefault(adapter_name, []).append("an adapter of %s" % name)
    if plan.shapes:
        check_vocabularies(model, plan.shapes, problems)
    if state == "absent":
        per_replica, count = None, None
    plan.checked.append(
        _Checked(
            model,
            name,
            engine,
            state,
            fields["restart"],
            replicas,
            fields["port"],
            per_replica,
            count,
            fields["fraction"],
            fields["env"],
        )
    )


def _check_pool_entries(plan):
    """Step 3: each declared pool with the models that name it, as one
    llama.cpp entry of the checked list (or absent)."""
    problems = plan.problems
    for pool_name, pool in sorted(plan.pools.items()):
        if pool_name in plan.seen:
            problems.append(
                "pool %s: name: also the name of a model on %s (they would share a container name)"
                % (pool_name, plan.host)
            )
            continue
        members = plan.members[pool_name]
        if pool.get("state", "started") == "absent":
            for member in members:
                problems.append(
                    "model %s: pool: pool %s is absent; remove the model or make it absent too"
                    % (member["name"], pool_name)
                )
            plan.absent.append(pool_name)
            continue
        if not members:
            problems.append("pool %s: no model of cortex_models names it in pool" % pool_name)
            continue
        restart = pool.get("restart_policy", plan.cfg["restart_policy"])
        if restart not in RESTART_POLICIES:
            problems.append(
                "pool %s: restart_policy: must be one of %s, got %r"
                % (pool_name, ", ".join(RESTART_POLICIES), restart)
            )
        port = pool.get("port")
        if port is not None and (not _is_int(port) or not 1 <= port <= 65535):
            problems.append("pool %s: port: must be a port number (1-65535), got %r" % (pool_name, port))
            port = None
        env = pool.get("env") or {}
        if not isinstance(env, dict):
            problems.append("pool %s: env: must be a mapping of names to values" % pool_name)
            env = {}
        per_replica, count = _replica_gpus("pool " + pool_name, pool.get("gpus"), 1, problems)
        entry = dict(pool, **{_POOL: members})
        plan.checked.append(
            _Checked(entry, pool_name, "llamacpp", "started", restart, 1, port, per_replica, count, None, env)
        )


def _check_served_names(plan):
    """Step 4: no name served twice (a model and an adapter, two adapters)."""
    for served, holders in sorted(plan.served_names.items()):
        if len(holders) > 1:
            plan.problems.append(
                "model %s: adapters: the name %s is both %s on %s; clients could not tell them apart"
                % (served, served, " and ".join(holders), plan.host)
            )


def _place_gpus(plan, gpu_count):
    """Step 5: GPUs: explicit indices first, then counts take the lowest free
    ones; a GPU held twice must be shared by fractions that fit it."""
    claims = {}
    _claim_explicit_gpus(plan, gpu_count, claims)
    for index, item in enumerate(plan.checked):
        if item.state == "absent" or item.count is None:
            continue
        plan.checked[index] = item._replace(per_replica=_claim_counted_gpus(plan, item, gpu_count, claims))
    _check_shared_gpus(plan, claims)


def _claim_explicit_gpus(plan, gpu_count, claims):
    for item in plan.checked:
        if item.state == "absent":
            continue
        for gpus in item.per_replica:
            for gpu in gpus or []:
                if gpu_count is not None and gpu >= gpu_count:
                    plan.problems.append(
                        "model %s: gpus: GPU %d does not exist on %s, which has %s"
                        % (
                            item.name,
                            gpu,
                            plan.host,
                            "no NVIDIA GPU"
                            if gpu_count == 0
                            else "%d GPU(s): 0-%d" % (gpu_count, gpu_count - 1),
                        )
                    )
                claims.setdefault(gpu, []).append((item.name, item.fraction))


def _claim_counted_gpus(plan, item, gpu_count, claims):
    """Each replica's GPUs for a model that asked for a number of them."""
    resolved = []
    for _replica in range(item.replicas):
        free = [g for g in range(gpu_count if gpu_count is not None else 64) if g not in claims]
        if len(free) < item.count:
            plan.problems.append(
                "model %s: gpus: %d GPU(s) per replica wanted, but only %d of %s's %s are unclaimed"
                % (item.name, item.count, len(free), plan.host, gpu_count if gpu_count is not None else "?")
            )
            resolved.append([])
            continue
        for gpu in free[: item.count]:
            claims.setdefault(gpu, []).append((item.name, item.fraction))
        resolved.append(free[: item.count])
    return resolved


def _check_shared_gpus(plan, claims):
    for gpu in sorted(claims):
        holders = claims[gpu]
        names = sorted(set(holder for holder, _fraction in holders))
        if len(holders) < 2:
            continue
        if any(f is None for _holder, f in holders):
            plan.problems.append(
                "model %s: gpus: GPU %d on %s is claimed by %s; models share a GPU only when each sets "
                "gpu_memory_fraction"
                % (
                    names[0],
                    gpu,
                    plan.host,
                    " and ".join(names) if len(names) > 1 else "%d replicas of %s" % (len(holders), names[0]),
                )
            )
        elif sum(f for _holder, f in holders) > 1.0 + 1e-9:
            plan.problems.append(
                "model %s: gpu_memory_fraction: the models sharing GPU %d on %s (%s) ask for %.2f of it in all"
                % (names[0], gpu, plan.host, ", ".join(names), sum(f for _holder, f in holders))
            )


def _claim_explicit_ports(plan):
    """Step 6: explicit ports first, so automatic ones (step 7) step around them."""
    for item in plan.checked:
        if item.state == "absent" or item.port is None:
            continue
        for replica in range(item.replicas):
            owner = plan.taken.get(item.port + replica)
            if owner:
                plan.problems.append(
                    "model %s: port: %d is also the port of %s on %s"
                    % (item.name, item.port + replica, owner, plan.host)
                )
            plan.taken[item.port + replica] = (
                "%s (replica %d)" % (item.name, replica) if item.replicas > 1 else item.name
            )


def _build_instances(plan):
    """Step 7: the containers, in the checked order: a pool's one, or one per
    replica of a model (absent ones listed apart)."""
    instances = []
    for item in plan.checked:
        if item.state == "absent":
            plan.absent.append(item.name)
        elif _POOL in item.model:
            try:
                instances.append(
                    _pool_instance(
                        item.model,
                        item.per_replica[0] or [],
                        item.port,
                        plan.taken,
                        item.restart,
                        item.env,
                        plan.shapes,
                        plan.cfg,
                    )
                )
            except (EngineCommandError, ValueError) as exc:
                plan.problems.append(str(exc))
        else:
            instances.extend(_model_instances(plan, item))
    return instances


def _model_instances(plan, item):
    """One instance per replica of a model with containers of its own."""
    cfg, shapes, name = plan.cfg, plan.shapes, item.name
    shape = shapes.get(name) or {}
    # A draft is loaded with the model: its start period counts it too.
    size = (shape.get("size_bytes") or 0) + (
        (shapes.get(draft_fetch_name(name)) or {}).get("size_bytes") or 0
    )
    health_timeout = _health_timeout(item.engine, item.model, size, cfg)
    files = feature_files(item.model, item.engine)
    instances = []
    for replica in range(item.replicas):
        gpus = item.per_replica[replica] or []
        if item.port is not None:
            host_port = item.port + replica
        else:
            host_port = _auto_port(
                "%s/%d" % (name, replica), int(cfg["port_base"]), int(cfg["port_span"]), plan.taken
            )
            plan.taken[host_port] = name
        entry = dict(item.model)
        entry.update({"model_file": source_file_name(item.model.get("source")), "gpus": gpus})
        entry[item.engine] = _engine_options(cfg, item.engine, item.model, gpus)
        try:
            command = _replica_command(plan, item, entry, host_port, shape)
        except EngineCommandError as exc:
            plan.problems.append(str(exc))
            continue
        instance = _instance_record(item, entry, replica, host_port, command, health_timeout, files, cfg)
        if name in plan.spans:
            instance.update(_span_fields(instance, item.model, plan.spans[name], cfg))
        instances.append(instance)
    return instances


def _replica_command(plan, item, entry, host_port, shape):
    """The engine's command line for one replica (``entry``: the model with
    this replica's engine options, which a rank on CPUs may change)."""
    cfg, name, model = plan.cfg, item.name, item.model
    if item.engine == "llamacpp":
        return llamacpp_command(entry, context_length=shape.get("context_length") or cfg["default_context"])
    if name not in plan.spans:
        return vllm_command(entry)
    node = plan.spans[name]
    options = entry["vllm"]
    if not entry["gpus"] and int(options.get("pipeline_parallel_size") or 1) > 1:
        # On CPUs, eager mode skips the warm-up that gives the later pipeline
        # stages their buffers: the first request crashed.
        if (model.get("vllm") or {}).get("enforce_eager"):
            plan.problems.append(
                "model %s: vllm.enforce_eager: pipeline parallelism on CPUs crashes in eager "
                "mode; leave it out (the ranks compile their graphs)" % name
            )
        entry["vllm"] = options = dict(options, enforce_eager=False)
    command = vllm_command(entry, nodes=node["nnodes"], listen=(cfg["address"], host_port)) + multinode_args(
        node
    )
    check_layout(
        name,
        int(options.get("tensor_parallel_size") or 1),
        int(options.get("pipeline_parallel_size") or 1),
        node["nnodes"],
        len(entry["gpus"]),
        (model.get("plan") or {}).get("hf_config") or shape.get("hf_config"),
        plan.problems,
    )
    return command


def _instance_record(item, entry, replica, host_port, command, health_timeout, files, cfg):
    """Everything the role needs to run one replica's container."""
    engine, model = item.engine, item.model
    engine_options = entry[engine]
    record = {
        "model": item.name,
        "engine": engine,
        "replica": replica,
        "replicas": item.replicas,
        "container": "%s%s-%d" % (cfg["container_prefix"], item.name, replica),
        "state": item.state,
        "port": host_port,
        "container_port": LLAMACPP_PORT if engine == "llamacpp" else VLLM_PORT,
        "url": "http://%s:%d" % (cfg["address"], host_port),
        "gpus": entry["gpus"],
        "gpu_memory_fraction": item.fraction,
        # Adapters served as model names, in llama.cpp's order (its ids).
        "adapters": [{"name": a["name"], "scale": float(a.get("scale", 1.0))} for a in adapters_of(model)],
        # Identifies the adapters' and draft's files, as io.cortex.source the model's.
        "features_id": _features_id(files),
        "command": command,
        "restart_policy": item.restart,
        "health_path": "/health",
        "health_timeout": health_timeout,
        "kind": _kind(engine, engine_options),
        "max_concurrency": _concurrency(engine, engine_options),
        # The gateway passes each key's class priority on to vLLM that orders by it.
        "priority_scheduling": engine == "vllm" and engine_options.get("scheduling_policy") == "priority",
        # The gateway's timeouts for this model, over its own defaults.
        "timeouts": dict(model.get("timeouts") or {}),
        # How the gateway picks a replica for it (over its own default).
        "routing": dict(model.get("routing") or {}),
        "healthcheck": _healthcheck(engine, health_timeout),
        # Seconds between `docker stop`'s SIGTERM and its SIGKILL: vLLM's
        # engine processes took 20 s to shut down on CPU.
        "stop_timeout": STOP_TIMEOUTS[engine],
        "source_kind": source_kind(model.get("source")),
        "model_file": entry["model_file"],
    }
    record.update(_container_runtime(item, entry, files, cfg))
    return record


def _container_runtime(item, entry, files, cfg):
    """The container's image, mounts, environment and in-memory folders."""
    engine = item.engine
    engine_options = entry[engine]
    # vLLM without GPUs runs in the CPU image, with its virtualenv mounted
    # from the host unless the image carries it.
    vllm_cpu = engine == "vllm" and not entry["gpus"]
    # vLLM on CPUs that compiles its graphs (not eager) loads the code it
    # compiled from its cache: a folder it may execute from (the /tmp tmpfs is noexec).
    compiles = vllm_cpu and not engine_options.get("enforce_eager")
    tensor_parallel = int(engine_options.get("tensor_parallel_size") or 1) if engine == "vllm" else 1
    venv_mount = {
        "type": "bind",
        "source": cfg.get("vllm_cpu_venv"),
        "target": VLLM_VENV_DIR,
        "read_only": True,
    }
    env = _merge(
        _merge(cfg.get("vllm_cpu_env") if vllm_cpu else {}, COMPILE_ENV if compiles else {}), item.env
    )
    return {
        "image": item.model.get("image") or cfg["images"]["vllm_cpu" if vllm_cpu else engine],
        # Mounts besides the key and the model (the role adds those).
        "extra_mounts": ([venv_mount] if vllm_cpu and cfg.get("vllm_cpu_venv") else [])
        + [_file_mount(f, cfg["models_dir"]) for f in files],
        "env": dict((str(k), str(v)) for k, v in env.items()),
        # Tensor parallelism talks through shared memory; vLLM's processes
        # pass their inputs there (on CPU, in buffers of a few hundred MiB).
        "ipc_mode": "host" if engine == "vllm" and tensor_parallel > 1 else None,
        "shm_size": ("1g" if vllm_cpu else "8g") if engine == "vllm" else None,
        # Writable in-memory folders under the read-only root.
        "tmpfs": (
            ["/tmp", COMPILE_TMPFS % (int(cfg["engine_uid"]), int(cfg["engine_uid"]))]  # noqa: S108 - the container's
            if compiles
            else ["/tmp"]  # noqa: S108 - the container's
        ),
        "entrypoint": list(VLLM_ENTRYPOINT) if engine == "vllm" else None,
    }


def _span_fields(instance, model, node, cfg):
    """What differs for this host's rank of a model that spans hosts.

    The rank shares the host's network (the group's traffic goes to ports of
    torch's own choosing); rank 0 listens on the role's address and port and
    is the group's API; the other ranks have none. Nothing restarts a rank
    alone (it would wait for a group that is gone): models.yml stops and
    starts the whole group (tasks/groups.yml).
    """
    rank = node["rank"]
    fields = {
        "network_mode": "host",
        "container_port": instance["port"],
        "rank": rank,
        "group": {"id": group_id(model), "hosts": node["hosts"]},
        "env": dict(instance["env"], **multinode_env(node)),
        "restart_policy": "no",
        # Where the group's API is, for this host's health checks: rank 0's,
        # when it listens beyond its own host's loopback (None: not seen from here).
        "group_url": instance["url"]
        if not rank
        else None
        if _loopback(cfg["address"])
        else "http://%s:%d" % (node["master_addr"], instance["port"]),
    }
    fields["healthcheck"] = _healthcheck("vllm", instance["health_timeout"], instance["port"])
    if rank:
        # No API of its own: its health is the group's, seen at rank 0.
        fields.update(headless=True, health_path=None, healthcheck={"test": ["NONE"]})
    if node["backend"] == "ray":
        fields.update(_ray_fields(instance, node))
    return fields


def _loopback(address):
    try:
        return ipaddress.ip_address(str(address)).is_loopback
    except ValueError:
        return str(address) == "localhost"


def _ray_fields(instance, node):
    """The ray backend: a Ray node per host; the head also runs vllm serve
    once every node has joined (rendered and checked; vLLM on CPUs refuses Ray)."""
    start = " ".join(ray_commands(node)[:-1])  # without --block: the head goes on
    if node["rank"]:
        return {"entrypoint": ray_commands(node), "command": []}
    wait = (
        "until [ \"$(ray status 2>/dev/null | grep -c ' node_')\" -ge %d ]; do sleep 2; done" % node["nnodes"]
    )
    serve = VLLM_ENTRYPOINT[2]
    return {"entrypoint": ["/bin/sh", "-c", "%s && %s && %s" % (start, wait, serve), "vllm-serve"]}


# Marks the pseudo model entry of a pool in host_instances (its models under it).
_POOL = "__pool_members__"
_POOL_STOP_TIMEOUT = 30


def _engine_options(cfg, engine, model, gpus):
    """The engine settings of one replica: the role's defaults for its kind
    (CPU, one GPU, several GPUs), then the model's own section over them."""
    if engine == "llamacpp":
        options = cfg.get("llamacpp") or {}
        if gpus:
            options = _merge(options, cfg.get("llamacpp_gpu") or {})
            if len(gpus) > 1:
                options = _merge(options, cfg.get("llamacpp_multi_gpu") or {})
        return _merge(options, model.get("llamacpp") or {})
    return _merge(
        _merge(cfg.get("vllm") or {}, cfg.get("vllm_gpu" if gpus else "vllm_cpu") or {}),
        model.get("vllm") or {},
    )


def _pool_instance(pool, gpus, port, taken, restart, env, shapes, cfg):
    """The one container of a pool: llama-server in router mode, its models
    in a preset file, each model's files mounted under /models/<model>."""
    name = pool["name"]
    host_port = port
    if host_port is None:
        host_port = _auto_port("%s/0" % name, int(cfg["port_base"]), int(cfg["port_span"]), taken)
    taken[host_port] = name
    members, sections, mounts = [], [], []
    preload_bytes = 0
    for model in pool[_POOL]:
        shape = shapes.get(model["name"]) or {}
        member, section, member_mounts = _pool_member(pool, model, gpus, shape, cfg)
        members.append(member)
        sections.append(section)
        mounts += member_mounts
        if member["preload"]:
            preload_bytes += shape.get("size_bytes") or 0
    preset = preset_text(name, sections)
    preset_path = "%s/.pools/%s.ini" % (cfg["models_dir"].rstrip("/"), name)
    mounts.append({"type": "bind", "source": preset_path, "target": PRESET_FILE, "read_only": True})
    return _pool_record(
        pool, members, mounts, preset, preset_path, host_port, gpus, restart, env, preload_bytes, cfg
    )


def _pool_member(pool, model, gpus, shape, cfg):
    """One model of a pool: what the gateway and model_plan know of it, its
    section of the preset file, and the mounts of its files."""
    member = model["name"]
    options = _engine_options(cfg, "llamacpp", model, gpus)
    entry = dict(model)
    file_name = source_file_name(model.get("source"))
    entry.update(
        {"model_file": member_model_file(member, file_name or ""), "gpus": gpus, "llamacpp": options}
    )
    command = llamacpp_command(entry, context_length=shape.get("context_length") or cfg["default_context"])
    idle = model.get("idle_unload_seconds", pool.get("idle_unload_seconds")) or 0
    section = preset_section(member, command, idle, bool(model.get("preload")))
    source = model.get("source") or {}
    folder = (
        str(source["path"]).rsplit("/", 1)[0] or "/"
        if source.get("path")
        else "%s/%s" % (cfg["models_dir"].rstrip("/"), member)
    )
    mounts = [{"type": "bind", "source": folder, "target": "/models/" + member, "read_only": True}]
    mounts += [_file_mount(f, cfg["models_dir"]) for f in feature_files(model, "llamacpp")]
    load_timeout = model.get("load_timeout", pool.get("load_timeout"))
    record = {
        "name": member,
        # The instance it would be on its own: what model_plan reads.
        "command": command,
        "max_concurrency": _concurrency("llamacpp", options),
        "kind": _kind("llamacpp", options),
        "timeouts": dict(model.get("timeouts") or {}),
        "routing": dict(model.get("routing") or {}),
        "adapters": [{"name": a["name"], "scale": float(a.get("scale", 1.0))} for a in adapters_of(model)],
        "idle_unload_seconds": int(idle),
        "preload": bool(model.get("preload")),
        # How long the gateway waits for it to load: its start period by default.
        "load_timeout": int(
            load_timeout
            if load_timeout is not None
            else _health_timeout("llamacpp", {}, shape.get("size_bytes"), cfg)
        ),
        "source": dict((k, v) for k, v in source.items() if k != "token"),
    }
    return record, section, mounts


def _pool_record(
    pool, members, mounts, preset, preset_path, host_port, gpus, restart, env, preload_bytes, cfg
):
    """Everything the role needs to run a pool's router container."""
    name = pool["name"]
    max_resident = pool.get("max_resident") or 1
    health_timeout = _health_timeout("llamacpp", {}, preload_bytes, cfg)
    identity = json.dumps([[m["name"], m["source"]] for m in members] + [preset], sort_keys=True)
    return {
        "model": name,
        "engine": "llamacpp",
        "replica": 0,
        "replicas": 1,
        "container": "%s%s-0" % (cfg["container_prefix"], name),
        "state": "started",
        "port": host_port,
        "container_port": LLAMACPP_PORT,
        "url": "http://%s:%d" % (cfg["address"], host_port),
        "gpus": gpus,
        "gpu_memory_fraction": None,
        "image": pool.get("image") or cfg["images"]["llamacpp"],
        "extra_mounts": mounts,
        "adapters": [],
        "features_id": None,
        "command": router_command(LLAMACPP_PORT, API_KEY_FILE, max_resident),
        "env": dict((str(k), str(v)) for k, v in env.items()),
        "restart_policy": restart,
        "health_path": "/health",
        "health_timeout": health_timeout,
        "kind": "pool",
        "max_concurrency": sum(m["max_concurrency"] for m in members),
        "timeouts": {},
        "routing": {},
        "ipc_mode": None,
        "shm_size": None,
        "entrypoint": None,
        "healthcheck": _healthcheck("llamacpp", health_timeout),
        # The router stops each model's process first (10 s each at most).
        "stop_timeout": _POOL_STOP_TIMEOUT,
        "source_kind": "pool",
        "model_file": None,
        "pool": {
            "name": name,
            "max_resident": max_resident,
            "members": members,
            "preset": preset,
            "preset_path": preset_path,
            # Identifies the models' files and the preset, as io.cortex.source a model's.
            "source_id": hashlib.sha1(identity.encode("utf-8")).hexdigest(),  # noqa: S324 - an identity
        },
    }


def _file_mount(extra, models_dir):
    """The read-only mount of an adapter's or draft's files."""
    source = extra["source"]
    if source.get("path"):
        # A GGUF file's folder, or vLLM's folder itself.
        folder = source["path"] if extra["engine"] == "vllm" else source["path"].rsplit("/", 1)[0] or "/"
    else:
        folder = "%s/%s" % (models_dir.rstrip("/"), extra["name"])
    return {"type": "bind", "source": folder, "target": extra["target"], "read_only": True}


def _features_id(files):
    """A digest of the extra files' sources (no token), or None without any."""
    if not files:
        return None
    text = json.dumps(
        [[f["name"], dict((k, v) for k, v in f["source"].items() if k != "token")] for f in files],
        sort_keys=True,
    )
    return hashlib.sha1(text.encode("utf-8")).hexdigest()  # noqa: S324 - an identity, not a secret


def fetch_list(models):
    """Everything the role fetches for a host: each model not absent, then
    its adapters and draft, each as ``{name, engine, source}`` (``plan`` kept)."""
    items = []
    for model in models or []:
        if not isinstance(model, dict) or model.get("state") == "absent":
            continue
        items.append(model)
        items += feature_files(model, model.get("engine"))
    return items


def fetch_id(item):
    """What identifies the files a fetch entry puts on a host: its name,
    engine and source (a key left out), not its engine settings, so a changed
    option does not fetch the files again."""
    source = dict(item.get("source") or {})
    source.pop("token", None)
    identity = {"name": item.get("name"), "engine": item.get("engine"), "source": source}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _fetch_stamps(stamps):
    """Each stamp the role left beside a model's files (one JSON object a
    line, as the role reads them), by name; lines that are not one are skipped."""
    found = {}
    for line in stamps or []:
        try:
            stamp = json.loads(line) if isinstance(line, str) else line
        except ValueError:
            continue
        if isinstance(stamp, dict) and isinstance(stamp.get("name"), str):
            found[stamp["name"]] = stamp
    return found


def _held_stamp(item, held):
    """The stamp of an entry the host holds as it is declared now (None: no
    stamp, one of another source, or a model on a host path, which has none)."""
    stamp = held.get(item.get("name")) or {}
    if "path" in (item.get("source") or {}) or stamp.get("id") != fetch_id(item):
        return None
    return stamp


def fetch_pending(items, stamps):
    """The fetch entries whose files the host does not hold as they are
    declared now: no stamp beside its files, or one of another source. A
    model on a host path is always checked (the role leaves no stamp there)."""
    held = _fetch_stamps(stamps)
    return [item for item in items or [] if _held_stamp(item, held) is None]


def fetched_shapes(items, stamps):
    """The shapes (what gguf_info read, and the entry's plan) of the entries
    the host holds as declared, from their stamps: what fetch.yml records for
    the others."""
    held = _fetch_stamps(stamps)
    shapes = {}
    for item in items or []:
        stamp = _held_stamp(item, held)
        if stamp is not None and (stamp.get("shape") or item.get("plan")):
            # As fetch.yml records it: the entry's plan over what was read.
            shapes[item["name"]] = dict(stamp.get("shape") or {}, **(item.get("plan") or {}))
    return shapes


def _healthcheck(engine, start_period, port=None):
    """Docker's own health check of an engine container, with its start period
    (``port``: where it listens when it shares the host's network)."""
    if engine == "llamacpp":
        test = ["CMD", "curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:%d/health" % LLAMACPP_PORT]
    else:
        probe = (
            "import http.client, sys; c = http.client.HTTPConnection('127.0.0.1', %d, timeout=4); "
            "c.request('GET', '/health'); sys.exit(c.getresponse().status != 200)" % (port or VLLM_PORT)
        )
        test = ["CMD", "python3", "-c", probe]
    return {
        "test": test,
        "interval": "10s",
        "timeout": "5s",
        "retries": 3,
        "start_period": "%ds" % start_period,
    }


def _kind(engine, options):
    """What a 1-token health probe should ask: an embedding or a completion."""
    if engine == "llamacpp":
        return "embedding" if options.get("embeddings") else "completion"
    pooling = options.get("runner") == "pooling" or options.get("task") in ("embed", "embedding")
    return "embedding" if pooling else "completion"


def _concurrency(engine, options):
    if engine == "llamacpp":
        return int(options.get("parallel") or 1)
    # vLLM schedules up to max_num_seqs sequences at once (its default is 256
    # on GPUs; the gateway's queue is sized from this number).
    return int(options.get("max_num_seqs") or 256)


def headless_endpoints(instances):
    """This host's ranks without an API (models that span hosts), for the
    health-check timer: each watched through its group's API at rank 0."""
    return [
        {
            "name": i["model"],
            "engine": i["engine"],
            "replica": 0,
            "container": i["container"],
            "url": i["group_url"],
            "start_period": i["health_timeout"],
            "kind": i["kind"],
            "headless": True,
            "spans": True,
        }
        for i in instances
        if i["state"] == "started" and i.get("headless")
    ]


def instance_endpoints(instances):
    """The gateway's view of a host's started instances: a pool's models each
    at the pool's URL, with what the gateway needs to wait for their loads."""
    endpoints = []
    for instance in instances:
        pool = instance.get("pool")
        if instance["state"] != "started" or not pool:
            continue
        for member in pool["members"]:
            endpoints.append(
                {
                    "name": member["name"],
                    "engine": "llamacpp",
                    "replica": 0,
                    "port": instance["port"],
                    "url": instance["url"],
                    "max_concurrency": member["max_concurrency"],
                    "timeouts": member["timeouts"],
                    "routing": member["routing"],
                    "container": instance["container"],
                    "start_period": instance["health_timeout"],
                    "kind": member["kind"],
                    "adapters": member["adapters"],
                    "pool": {
                        "name": pool["name"],
                        "max_resident": pool["max_resident"],
                        "load_timeout": member["load_timeout"],
                    },
                }
            )
    resident = []
    for i in instances:
        if i["state"] != "started" or i.get("pool") or i.get("headless"):
            continue
        endpoint = {
            "name": i["model"],
            "engine": i["engine"],
            "replica": i["replica"],
            "port": i["port"],
            "url": i["url"],
            "max_concurrency": i["max_concurrency"],
            "timeouts": i.get("timeouts") or {},
            "routing": i.get("routing") or {},
            "priority_scheduling": bool(i.get("priority_scheduling")),
            # For the health-check timer of the host.
            "container": i["container"],
            "start_period": i["health_timeout"],
            "kind": i["kind"],
            "adapters": i.get("adapters") or [],
        }
        if i.get("group"):
            # Rank 0 of a model that spans hosts: its /health sees only its own
            # host's processes; the gateway sends it a 1-token request instead.
            endpoint["health_probe"] = i["kind"]
            endpoint["spans"] = True
        resident.append(endpoint)
    return resident + endpoints
