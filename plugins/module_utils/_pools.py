# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""On-demand models: pools of llama.cpp models served by one llama-server in
router mode.

A host's ``cortex_model_pools`` declares each pool (its GPUs, how many of its
models may be resident at once, how long an idle model stays loaded); a model
of ``cortex_models`` joins one with ``pool: NAME``. The pool is one container:
llama-server started without a model, with a preset file that has one section
per model (the flags the model would have on its own, without their dashes),
``--models-max`` for the resident set. llama-server then starts a model's
process when a request names it, queues the requests that arrive while it
loads, and stops the least recently used idle model when the set is full.

Private to the collection.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import posixpath

POOL_KEYS = (
    "name",
    "gpus",
    "max_resident",
    "idle_unload_seconds",
    "load_timeout",
    "port",
    "restart_policy",
    "image",
    "env",
    "state",
)
# What a model of a pool may set besides a model's usual keys.
MEMBER_KEYS = ("pool", "idle_unload_seconds", "load_timeout", "preload")
# A model's keys that belong to its pool when it has one.
POOL_OWNED = (
    "replicas",
    "gpus",
    "port",
    "gpu_memory_fraction",
    "image",
    "restart_policy",
    "env",
    "health_timeout",
)
# Where the preset file is inside the pool's container.
PRESET_FILE = "/etc/cortex-pool/models.ini"
# The router's flags that are the pool's, not a model's: llama-server's router
# replaces or drops them for each model's process anyway.
_ROUTER_OWNED = ("--host", "--port", "--api-key-file", "--alias", "--no-webui")
# Characters a preset value cannot hold (comments, line ends).
_INI_UNSAFE = (";", "#", "\n", "\r")


def pool_of(model):
    pool = model.get("pool") if isinstance(model, dict) else None
    return pool if isinstance(pool, str) and pool else None


def _whole(value, least):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_pool(pool, position, host, problems):
    """The problems of one ``cortex_model_pools`` entry; returns its name or None."""
    if not isinstance(pool, dict):
        problems.append("cortex_model_pools[%d] on %s: must be a mapping, got %r" % (position, host, pool))
        return None
    name = pool.get("name")
    if not isinstance(name, str) or not name:
        problems.append("cortex_model_pools[%d] on %s: name: required (the pool's name)" % (position, host))
        return None
    where = "pool %s" % name
    unknown = sorted(set(pool) - set(POOL_KEYS))
    if unknown:
        problems.append(
            "%s: %s: not a pool setting (known: %s)" % (where, ", ".join(unknown), ", ".join(POOL_KEYS))
        )
    if pool.get("max_resident") is not None and not _whole(pool["max_resident"], 1):
        problems.append(
            "%s: max_resident: the models loaded at once, a whole number of 1 or more, got %r"
            % (where, pool["max_resident"])
        )
    for key in ("idle_unload_seconds", "load_timeout"):
        if pool.get(key) is not None and not _whole(pool[key], 0 if key == "idle_unload_seconds" else 1):
            problems.append(
                "%s: %s: must be a whole number of seconds (%s), got %r"
                % (where, key, "0: never" if key == "idle_unload_seconds" else "1 or more", pool[key])
            )
    if pool.get("state", "started") not in ("started", "absent"):
        problems.append("%s: state: must be started or absent, got %r" % (where, pool.get("state")))
    return name


def check_member(model, pools, problems):
    """The problems of a model that names a pool (``pools``: name -> entry)."""
    name = model.get("name")
    pool = model.get("pool")
    where = "model %s" % name
    if not isinstance(pool, str) or pool not in pools:
        problems.append(
            "%s: pool: %r is not a pool of this host (cortex_model_pools has %s)"
            % (where, pool, ", ".join(sorted(pools)) or "none")
        )
        return
    if model.get("engine") != "llamacpp":
        problems.append(
            "%s: pool: pools are llama.cpp's router mode; a %s model runs in its own container"
            % (where, model.get("engine"))
        )
    for key in POOL_OWNED:
        if model.get(key) is not None and not (key == "replicas" and model[key] == 1):
            problems.append(
                "%s: %s: set on pool %s instead (its models share its container and GPUs)"
                % (where, key, pool)
            )
    if model.get("state", "started") == "stopped":
        problems.append(
            "%s: state: a model of a pool is started or absent; it is loaded only when asked for" % where
        )
    if (model.get("speculative") or {}).get("draft") if isinstance(model.get("speculative"), dict) else False:
        problems.append(
            "%s: speculative.draft: not supported for a model of a pool; use an n-gram method" % where
        )
    for key in ("idle_unload_seconds", "load_timeout"):
        least = 0 if key == "idle_unload_seconds" else 1
        if model.get(key) is not None and not _whole(model[key], least):
            problems.append("%s: %s: must be a whole number of seconds, got %r" % (where, key, model[key]))
    if model.get("preload") is not None and not isinstance(model["preload"], bool):
        problems.append("%s: preload: must be true or false, got %r" % (where, model["preload"]))


def misplaced_member_keys(model):
    """Pool-only keys set on a model without a pool."""
    return [k for k in MEMBER_KEYS if k != "pool" and model.get(k) is not None]


def member_model_file(member, file_name):
    """A member's file inside the pool's container: its folder under /models."""
    return posixpath.join(member, file_name)


def preset_section(member, args, idle_seconds=0, preload=False):
    """One model's preset section from its llama-server arguments.

    Each flag goes in without its dashes; a flag without a value is ``true``;
    a repeated flag's values are joined by commas, as llama-server's list
    flags take them. Raises ValueError naming a value a preset cannot hold.
    """
    values = []
    index = 0
    while index < len(args):
        flag = args[index]
        value = None
        if index + 1 < len(args) and not args[index + 1].startswith("--"):
            value = args[index + 1]
            index += 1
        index += 1
        if flag in _ROUTER_OWNED:
            continue
        if not flag.startswith("--"):
            raise ValueError(
                "model %s: %r is not a flag; it cannot go into the pool's preset" % (member, flag)
            )
        key = flag[2:]
        value = "true" if value is None else value
        if any(c in value for c in _INI_UNSAFE):
            raise ValueError(
                "model %s: %s %r: a pool's preset file cannot hold ';', '#' or line breaks in a value"
                % (member, flag, value)
            )
        for position, (known, old) in enumerate(values):
            if known == key:
                values[position] = (key, old + "," + value)
                break
        else:
            values.append((key, value))
    if idle_seconds:
        # The model's process unloads its weights and KV cache after this
        # long without a request, and loads them again for the next one.
        values.append(("sleep-idle-seconds", str(int(idle_seconds))))
    values.append(("load-on-startup", "true" if preload else "false"))
    lines = ["[%s]" % member] + ["%s = %s" % (k, v) for k, v in values]
    return "\n".join(lines) + "\n"


def preset_text(pool, sections):
    header = (
        "; llama-server router preset of pool %s, written by cortex.serving's model_servers role.\n"
        "version = 1\n\n" % pool
    )
    return header + "\n".join(sections)


def router_command(port, api_key_file, max_resident):
    """llama-server without a model: the router of the pool's models."""
    return [
        "--host",
        "0.0.0.0",  # noqa: S104 - inside the container; published on loopback
        "--port",
        str(port),
        "--api-key-file",
        api_key_file,
        "--models-preset",
        PRESET_FILE,
        "--models-max",
        str(max_resident),
        "--no-webui",
    ]
