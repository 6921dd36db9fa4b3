# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""LoRA adapters and speculative decoding of a model entry.

Both are declared on the model (``adapters``, ``speculative``) whatever its
engine, checked here with every problem named, and rendered to each engine's
own flags:

- llama.cpp loads every adapter at scale 0 (``--lora-scaled FILE:0``), so a
  request gets one only when the gateway names it in the request's ``lora``
  field; vLLM serves each adapter under its own name (``--lora-modules``).
- llama.cpp speculates with a draft model (``--spec-draft-model``) or one of
  its n-gram methods (``--spec-type``); vLLM takes one JSON mapping
  (``--speculative-config``).

The extra files (adapters, a draft) are fetched like model files, each into
its own folder, and mounted read-only under ADAPTER_DIR and DRAFT_DIR.

Private to the collection.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import posixpath
import re

from ansible_collections.cortex.serving.plugins.module_utils._sources import source_file_name

ADAPTER_DIR = "/adapters"
DRAFT_DIR = "/draft"
# Joins a model's name to its extra files' names (fetch folders, shapes): a
# character no model name has, so they never meet a model's own.
FILE_SEPARATOR = "+"

# Speculative methods: what each knob of the ``speculative`` section renders to.
LLAMACPP_METHODS = {
    "draft": {
        "type": "draft-simple",
        "max_tokens": "--spec-draft-n-max",
        "min_tokens": "--spec-draft-n-min",
        "p_min": "--spec-draft-p-min",
    },
    "ngram-mod": {
        "type": "ngram-mod",
        "max_tokens": "--spec-ngram-mod-n-max",
        "min_tokens": "--spec-ngram-mod-n-min",
        "ngram_size": "--spec-ngram-mod-n-match",
    },
    "ngram-simple": {
        "type": "ngram-simple",
        "max_tokens": "--spec-ngram-simple-size-m",
        "ngram_size": "--spec-ngram-simple-size-n",
        "min_hits": "--spec-ngram-simple-min-hits",
    },
    "ngram-map-k": {
        "type": "ngram-map-k",
        "max_tokens": "--spec-ngram-map-k-size-m",
        "ngram_size": "--spec-ngram-map-k-size-n",
        "min_hits": "--spec-ngram-map-k-min-hits",
    },
    "ngram-map-k4v": {
        "type": "ngram-map-k4v",
        "max_tokens": "--spec-ngram-map-k4v-size-m",
        "ngram_size": "--spec-ngram-map-k4v-size-n",
        "min_hits": "--spec-ngram-map-k4v-min-hits",
    },
    "ngram-cache": {"type": "ngram-cache"},
}
VLLM_METHODS = {
    "draft_model": {"max_tokens": "num_speculative_tokens"},
    "ngram": {
        "max_tokens": "num_speculative_tokens",
        "ngram_size": "prompt_lookup_max",
        "ngram_min": "prompt_lookup_min",
    },
}
SPECULATIVE_KEYS = (
    "method",
    "draft",
    "max_tokens",
    "min_tokens",
    "p_min",
    "ngram_size",
    "ngram_min",
    "min_hits",
)
DRAFT_KEYS = {
    "llamacpp": ("source", "n_gpu_layers", "devices", "cache_type_k", "cache_type_v"),
    "vllm": ("source",),
}
ADAPTER_KEYS = ("name", "source", "scale")
# vLLM's --max-lora-rank choices (its pinned parser's table).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# A name clients ask for (a model's or an adapter's).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value, least):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _unknown_keys(section, known, where, problems, what=""):
    unknown = sorted(set(section) - set(known))
    if unknown:
        problems.append("%s.%s: not a known key%s (known: %s)" % (where, unknown[0], what, ", ".join(known)))


def _needs_folder(engine, source, where, what, problems):
    """vLLM loads an adapter or a draft from a folder the role puts on the host."""
    if engine == "vllm" and isinstance(source, dict) and source.get("hf_repo"):
        problems.append(
            "%s.hf_repo: give vLLM's %s as a folder (source.path, wheel or an url archive)" % (where, what)
        )


def adapter_fetch_name(model_name, adapter_name):
    return "%s%slora%s%s" % (model_name, FILE_SEPARATOR, FILE_SEPARATOR, adapter_name)


def draft_fetch_name(model_name):
    return "%s%sdraft" % (model_name, FILE_SEPARATOR)


def adapters_of(model):
    """The model's adapters as checked entries (a list, maybe empty)."""
    adapters = model.get("adapters") or []
    return adapters if isinstance(adapters, list) else []


def speculative_of(model):
    spec = model.get("speculative")
    return spec if isinstance(spec, dict) else None


def draft_of(model):
    spec = speculative_of(model) or {}
    draft = spec.get("draft")
    return draft if isinstance(draft, dict) else None


def method_of(model, engine):
    """The speculative method, with the default each engine takes for a draft."""
    spec = speculative_of(model)
    if not spec:
        return None
    if spec.get("method"):
        return spec["method"]
    if spec.get("draft"):
        return "draft" if engine == "llamacpp" else "draft_model"
    return None


def check_features(model, engine, check_source, problems, gpu_count_of_replica=None):
    """Every problem of the model's ``adapters`` and ``speculative`` sections.

    ``check_source(where, source)`` checks a source as the model's own is
    checked (appending to ``problems``). Returns the adapter names declared.
    """
    name = model.get("name")
    names = []
    adapters = model.get("adapters")
    if adapters is not None and not isinstance(adapters, list):
        problems.append("model %s: adapters: must be a list of {name, source, scale}" % name)
        adapters = []
    for position, adapter in enumerate(adapters or []):
        where = "model %s: adapters[%d]" % (name, position)
        if not isinstance(adapter, dict):
            problems.append("%s: must be a mapping with name and source" % where)
            continue
        _unknown_keys(adapter, ADAPTER_KEYS, where, problems)
        adapter_name = adapter.get("name")
        if not isinstance(adapter_name, str) or not NAME.match(adapter_name):
            problems.append(
                "%s.name: the model name clients ask for; use letters, digits, '.', '_' and '-', got %r"
                % (where, adapter_name)
            )
            continue
        where = "model %s: adapter %s" % (name, adapter_name)
        if adapter_name in names:
            problems.append("%s: name: declared twice" % where)
        names.append(adapter_name)
        scale = adapter.get("scale", 1.0)
        if not _number(scale) or scale <= 0:
            problems.append("%s: scale: must be a number above 0, got %r" % (where, scale))
        source = adapter.get("source")
        check_source(where + ": source", source)
        _needs_folder(engine, source, where + ": source", "adapters", problems)
        file_name = (source_file_name(source) or "") if engine == "llamacpp" else ""
        if ":" in file_name or "," in file_name:
            problems.append(
                "%s: source: the file name may not hold ':' or ',' (llama-server's --lora-scaled)" % where
            )
    _check_speculative(model, engine, check_source, problems, gpu_count_of_replica)
    return names


def _check_speculative(model, engine, check_source, problems, gpu_count):
    name = model.get("name")
    spec = model.get("speculative")
    if spec is None:
        return
    where = "model %s: speculative" % name
    if not isinstance(spec, dict):
        problems.append("%s: must be a mapping (method, draft, max_tokens, ...)" % where)
        return
    _unknown_keys(spec, SPECULATIVE_KEYS, where, problems)
    methods = LLAMACPP_METHODS if engine == "llamacpp" else VLLM_METHODS
    method = method_of(model, engine)
    if method is None:
        problems.append(
            "%s.method: give a method (%s), or a draft model" % (where, ", ".join(sorted(methods)))
        )
        return
    if method not in methods:
        problems.append(
            "%s.method: %s speculates with %s, got %r" % (where, engine, ", ".join(sorted(methods)), method)
        )
        return
    knobs = methods[method]
    draft = spec.get("draft")
    needs_draft = method in ("draft", "draft_model")
    if needs_draft and not isinstance(draft, dict):
        problems.append("%s.draft: method %s needs a draft model (draft.source)" % (where, method))
    if draft is not None and not needs_draft:
        problems.append("%s.draft: method %s uses no draft model; leave draft out" % (where, method))
    for key in ("max_tokens", "min_tokens", "ngram_size", "ngram_min", "min_hits"):
        if spec.get(key) is None:
            continue
        if key not in knobs:
            problems.append(
                "%s.%s: method %s has no such setting (it has: %s)"
                % (where, key, method, ", ".join(k for k in SPECULATIVE_KEYS if k in knobs) or "none")
            )
        elif not _whole(spec[key], 0 if key == "min_tokens" else 1):
            problems.append(
                "%s.%s: must be a whole number of %d or more, got %r"
                % (where, key, 0 if key == "min_tokens" else 1, spec[key])
            )
    if spec.get("p_min") is not None:
        if "p_min" not in knobs:
            problems.append("%s.p_min: method %s has no such setting" % (where, method))
        elif not _number(spec["p_min"]) or not 0 <= spec["p_min"] <= 1:
            problems.append("%s.p_min: must be a number from 0 to 1, got %r" % (where, spec["p_min"]))
    low, high = spec.get("min_tokens"), spec.get("max_tokens")
    if _whole(low, 0) and _whole(high, 1) and low > high:
        problems.append("%s.min_tokens: %d is more than max_tokens %d" % (where, low, high))
    low, high = spec.get("ngram_min"), spec.get("ngram_size")
    if _whole(low, 1) and _whole(high, 1) and low > high:
        problems.append("%s.ngram_min: %d is more than ngram_size %d" % (where, low, high))
    if engine == "vllm" and spec.get("max_tokens") is None:
        problems.append(
            "%s.max_tokens: vLLM needs the number of tokens to speculate (num_speculative_tokens)" % where
        )
    if not isinstance(draft, dict):
        return
    where = "%s.draft" % where
    _unknown_keys(draft, DRAFT_KEYS[engine], where, problems, " for %s" % engine)
    check_source(where + ".source", draft.get("source"))
    _needs_folder(engine, draft.get("source"), where + ".source", "draft", problems)
    if draft.get("n_gpu_layers") is not None and not _whole(draft["n_gpu_layers"], 0):
        problems.append(
            "%s.n_gpu_layers: must be a whole number of 0 or more, got %r" % (where, draft["n_gpu_layers"])
        )
    # Imported here: the engine command module imports this one.
    from ansible_collections.cortex.serving.plugins.module_utils._engine_command import CACHE_TYPES

    for key in ("cache_type_k", "cache_type_v"):
        if draft.get(key) is not None and draft[key] not in CACHE_TYPES:
            problems.append(
                "%s.%s: must be one of %s, got %r" % (where, key, ", ".join(CACHE_TYPES), draft[key])
            )
    devices = draft.get("devices")
    if devices is not None:
        if not isinstance(devices, list) or not devices or not all(_whole(d, 0) for d in devices):
            problems.append(
                "%s.devices: positions in the replica's gpus list (0 is its first GPU), got %r"
                % (where, devices)
            )
        elif gpu_count is not None and max(devices) >= gpu_count:
            problems.append(
                "%s.devices: position %d, but each replica has %d GPU(s)" % (where, max(devices), gpu_count)
            )


def check_vocabularies(model, shapes, problems):
    """The draft must share the target's vocabulary, as llama.cpp requires;
    an adapter must be a LoRA adapter of the target's architecture."""
    name = model.get("name")
    target = shapes.get(name) or {}
    if draft_of(model):
        draft = shapes.get(draft_fetch_name(name)) or {}
        mine, theirs = target.get("vocabulary"), draft.get("vocabulary")
        if mine and theirs:
            problem = vocabulary_mismatch(mine, theirs)
            if problem:
                problems.append(
                    "model %s: speculative.draft: the draft's vocabulary differs from the model's (%s); "
                    "llama.cpp would not speculate with it" % (name, problem)
                )
    for adapter in adapters_of(model):
        if not isinstance(adapter, dict) or not adapter.get("name"):
            continue
        shape = shapes.get(adapter_fetch_name(name, adapter["name"])) or {}
        if not shape or not target:
            continue
        if shape.get("type") != "adapter" or shape.get("adapter_type") != "lora":
            problems.append(
                "model %s: adapter %s: its file is a %s, not a LoRA adapter (general.type adapter, adapter.type lora)"
                % (name, adapter["name"], shape.get("type") or "file")
            )
        elif shape.get("architecture") != target.get("architecture"):
            problems.append(
                "model %s: adapter %s: an adapter for %s, but the model is %s"
                % (name, adapter["name"], shape.get("architecture"), target.get("architecture"))
            )


def vocabulary_mismatch(target, draft):
    """How two vocabularies differ, in words (None: compatible), by llama.cpp's rules."""
    if target.get("model") != draft.get("model"):
        return "tokenizer %s, not %s" % (draft.get("model"), target.get("model"))
    for token in ("bos", "eos"):
        adds = (bool(target.get("add_%s_token" % token)), bool(draft.get("add_%s_token" % token)))
        ids = (target.get("%s_token_id" % token), draft.get("%s_token_id" % token))
        if adds[0] != adds[1]:
            return "adds the %s token: %s, not %s" % (token.upper(), adds[1], adds[0])
        if adds[0] and ids[0] != ids[1]:
            return "%s token %s, not %s" % (token.upper(), ids[1], ids[0])
    counts = (int(target.get("tokens") or 0), int(draft.get("tokens") or 0))
    if abs(counts[0] - counts[1]) > 128:
        return "%d tokens, not %d (llama.cpp allows 128 apart)" % (counts[1], counts[0])
    if counts[0] == counts[1] and target.get("tokens_sha256") != draft.get("tokens_sha256"):
        return "the same number of tokens, but other token texts"
    return None


def _file_in(folder, source):
    return posixpath.join(folder, source_file_name(source) or "")


def llamacpp_feature_args(model, gpus):
    """llama-server flags for the model's adapters and speculation."""
    args = []
    for adapter in adapters_of(model):
        # Loaded at scale 0: only a request that names it (the gateway sets
        # its `lora` field) gets it, at the adapter's scale.
        path = _file_in(posixpath.join(ADAPTER_DIR, adapter["name"]), adapter["source"])
        args += ["--lora-scaled", "%s:0" % path]
    spec = speculative_of(model)
    method = method_of(model, "llamacpp")
    if not spec or method not in LLAMACPP_METHODS:
        return args
    knobs = LLAMACPP_METHODS[method]
    args += ["--spec-type", knobs["type"]]
    draft = draft_of(model)
    if draft:
        args += ["--spec-draft-model", _file_in(DRAFT_DIR, draft["source"])]
        layers = draft.get("n_gpu_layers")
        args += ["--spec-draft-ngl", str(layers if layers is not None else (999 if gpus else 0))]
        if gpus and draft.get("devices"):
            args += ["--spec-draft-device", ",".join("CUDA%d" % d for d in draft["devices"])]
        for key, flag in (("cache_type_k", "--spec-draft-type-k"), ("cache_type_v", "--spec-draft-type-v")):
            if draft.get(key):
                args += [flag, str(draft[key])]
    for key in ("max_tokens", "min_tokens", "p_min", "ngram_size", "min_hits"):
        if spec.get(key) is not None and key in knobs:
            args += [knobs[key], str(spec[key])]
    return args


def vllm_feature_args(model):
    """vllm serve flags for the model's adapters and speculation."""
    args = []
    adapters = adapters_of(model)
    if adapters:
        args += ["--enable-lora", "--max-loras", str(len(adapters)), "--lora-modules"]
        args += ["%s=%s" % (a["name"], posixpath.join(ADAPTER_DIR, a["name"])) for a in adapters]
    spec = speculative_of(model)
    method = method_of(model, "vllm")
    if spec and method in VLLM_METHODS:
        config = {"method": method}
        for key, field in VLLM_METHODS[method].items():
            if spec.get(key) is not None:
                config[field] = spec[key]
        if draft_of(model):
            config["model"] = DRAFT_DIR
        args += ["--speculative-config", json.dumps(config, sort_keys=True, separators=(",", ":"))]
    return args


def feature_files(model, engine):
    """The extra files of a model to fetch: ``{name, engine, source, kind, mount}``."""
    files = []
    for adapter in adapters_of(model):
        if isinstance(adapter, dict) and adapter.get("name") and isinstance(adapter.get("source"), dict):
            files.append(
                {
                    "name": adapter_fetch_name(model["name"], adapter["name"]),
                    "engine": engine,
                    "source": adapter["source"],
                    "kind": "adapter",
                    "target": posixpath.join(ADAPTER_DIR, adapter["name"]),
                }
            )
    draft = draft_of(model)
    if draft and isinstance(draft.get("source"), dict):
        files.append(
            {
                "name": draft_fetch_name(model["name"]),
                "engine": engine,
                "source": draft["source"],
                "kind": "draft",
                "target": DRAFT_DIR,
            }
        )
    return files
