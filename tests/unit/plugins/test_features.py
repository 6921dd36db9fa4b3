"""LoRA adapters and speculative decoding from inventory: checked, rendered to
each engine's flags (vLLM's against its pinned parser), fetched and mounted,
the draft's vocabulary compared with the target's, and its memory planned."""

from __future__ import annotations

import json

import gguf
import pytest
from ansible_collections.cortex.serving.plugins.module_utils._features import vocabulary_mismatch
from ansible_collections.cortex.serving.plugins.module_utils._fleet import FleetError, routing_table
from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import read_gguf_info
from ansible_collections.cortex.serving.plugins.module_utils._models import (
    ModelsError,
    fetch_list,
    host_instances,
    instance_endpoints,
)
from ansible_collections.cortex.serving.plugins.module_utils._plan import MIB, plan

from tests.gguf_shapes import write_gguf
from tests.lora_adapters import write_gguf_lora

from .vllm_parser import parse

SMOL = {"name": "smol", "engine": "llamacpp", "source": {"path": "/srv/m/smol.gguf"}}
PIRATE = {
    "name": "smol-pirate",
    "source": {"url": "https://example.org/p.gguf", "sha256": "a" * 64},
    "scale": 0.5,
}


def one(models, host="gpu-a", gpu_count=0, **extra):
    return host_instances(models, host, gpu_count, **extra)["instances"]


def problems(models, gpu_count=0, **extra):
    with pytest.raises(ModelsError) as info:
        host_instances(models, "gpu-a", gpu_count, **extra)
    return info.value.problems


def after(args, flag):
    return args[args.index(flag) + 1]


def test_llamacpp_loads_every_adapter_at_zero_from_its_own_mount():
    instance = one(
        [{**SMOL, "adapters": [PIRATE, {"name": "smol-legal", "source": {"path": "/srv/l/legal.gguf"}}]}]
    )[0]
    command = instance["command"]
    lora = [command[i + 1] for i, arg in enumerate(command) if arg == "--lora-scaled"]
    assert lora == ["/adapters/smol-pirate/p.gguf:0", "/adapters/smol-legal/legal.gguf:0"]
    mounts = {m["target"]: m for m in instance["extra_mounts"]}
    # A fetched adapter has its own folder; a host path's folder is mounted as it is.
    assert mounts["/adapters/smol-pirate"]["source"] == "/var/lib/cortex/models/smol+lora+smol-pirate"
    assert mounts["/adapters/smol-legal"]["source"] == "/srv/l"
    assert all(m["read_only"] for m in mounts.values())
    # The gateway learns the adapters in the engine's order (their ids).
    assert instance_endpoints([instance])[0]["adapters"] == [
        {"name": "smol-pirate", "scale": 0.5},
        {"name": "smol-legal", "scale": 1.0},
    ]


def test_an_adapter_change_replaces_the_containers_and_no_adapter_changes_nothing():
    plain = one([SMOL])[0]
    first = one([{**SMOL, "adapters": [PIRATE]}])[0]
    other = one([{**SMOL, "adapters": [{**PIRATE, "source": {**PIRATE["source"], "sha256": "b" * 64}}]}])[0]
    assert plain["features_id"] is None  # no label: existing containers stay as they are
    assert first["features_id"]
    assert other["features_id"]
    assert first["features_id"] != other["features_id"]


def test_vllm_serves_each_adapter_under_its_name_and_parses():
    model = {
        "name": "llama",
        "engine": "vllm",
        "source": {"path": "/srv/llama"},
        "gpus": [0],
        "adapters": [{"name": "llama-sql", "source": {"path": "/srv/sql-lora"}}],
        "vllm": {"max_lora_rank": 64},
    }
    command = one([model], gpu_count=1)[0]["command"]
    parsed = parse([*command, "--api-key", "k"])
    assert parsed.enable_lora is True
    assert parsed.lora_modules == ["llama-sql=/adapters/llama-sql"]
    assert parsed.max_loras == 1
    assert parsed.max_lora_rank == 64


def test_a_llamacpp_draft_renders_to_its_flags_and_mount():
    model = {
        **SMOL,
        "gpus": [0, 1],
        "speculative": {
            "draft": {"source": {"path": "/srv/d/draft.gguf"}, "devices": [1], "cache_type_k": "q8_0"},
            "max_tokens": 16,
            "min_tokens": 2,
            "p_min": 0.6,
        },
    }
    instance = one([model], gpu_count=2)[0]
    command = instance["command"]
    assert after(command, "--spec-type") == "draft-simple"
    assert after(command, "--spec-draft-model") == "/draft/draft.gguf"
    assert after(command, "--spec-draft-ngl") == "999"
    assert after(command, "--spec-draft-device") == "CUDA1"
    assert after(command, "--spec-draft-type-k") == "q8_0"
    assert (after(command, "--spec-draft-n-max"), after(command, "--spec-draft-n-min")) == ("16", "2")
    assert after(command, "--spec-draft-p-min") == "0.6"
    assert {"type": "bind", "source": "/srv/d", "target": "/draft", "read_only": True} in instance[
        "extra_mounts"
    ]


def test_llamacpp_ngram_methods_take_their_own_flags():
    command = one([{**SMOL, "speculative": {"method": "ngram-mod", "max_tokens": 32, "ngram_size": 12}}])[0][
        "command"
    ]
    assert after(command, "--spec-type") == "ngram-mod"
    assert (after(command, "--spec-ngram-mod-n-max"), after(command, "--spec-ngram-mod-n-match")) == (
        "32",
        "12",
    )
    assert "--spec-draft-model" not in command
    command = one([{**SMOL, "speculative": {"method": "ngram-simple", "max_tokens": 8, "min_hits": 2}}])[0][
        "command"
    ]
    assert (after(command, "--spec-ngram-simple-size-m"), after(command, "--spec-ngram-simple-min-hits")) == (
        "8",
        "2",
    )


@pytest.mark.parametrize(
    ("speculative", "config"),
    [
        (
            {"method": "ngram", "max_tokens": 4, "ngram_size": 5, "ngram_min": 2},
            {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 5, "prompt_lookup_min": 2},
        ),
        (
            {"draft": {"source": {"path": "/srv/small"}}, "max_tokens": 3},
            {"method": "draft_model", "model": "/draft", "num_speculative_tokens": 3},
        ),
    ],
)
def test_vllm_takes_its_speculative_config_as_json(speculative, config):
    model = {"name": "llama", "engine": "vllm", "source": {"path": "/srv/llama"}, "gpus": [0]}
    command = one([{**model, "speculative": speculative}], gpu_count=1)[0]["command"]
    parsed = parse([*command, "--api-key", "k"])
    assert json.loads(parsed.speculative_config) == config


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({**SMOL, "adapters": {"name": "x"}}, "model smol: adapters: must be a list"),
        ({**SMOL, "adapters": [{"name": "bad name", "source": {"path": "/a.gguf"}}]}, "adapters[0].name"),
        ({**SMOL, "adapters": [{"name": "a", "source": {"path": "/a.gguf"}, "rank": 8}]}, "adapters[0].rank"),
        (
            {**SMOL, "adapters": [{"name": "a", "source": {"path": "/a.bin"}}]},
            "adapter a: source: llama.cpp serves",
        ),
        ({**SMOL, "adapters": [{"name": "a", "source": {"path": "/a:1.gguf"}}]}, "may not hold ':'"),
        ({**SMOL, "adapters": [{"name": "a", "source": {"path": "/a.gguf"}, "scale": -1}]}, "scale: must be"),
        (
            {**SMOL, "adapters": [{"name": "smol", "source": {"path": "/a.gguf"}}]},
            "the name smol is both a model",
        ),
        ({**SMOL, "speculative": {"max_tokens": 4}}, "speculative.method: give a method"),
        ({**SMOL, "speculative": {"method": "eagle"}}, "llamacpp speculates with draft, ngram-cache"),
        ({**SMOL, "speculative": {"method": "draft"}}, "speculative.draft: method draft needs a draft model"),
        ({**SMOL, "speculative": {"method": "ngram-mod", "p_min": 0.5}}, "p_min: method ngram-mod has no"),
        (
            {**SMOL, "speculative": {"method": "ngram-cache", "max_tokens": 4}},
            "max_tokens: method ngram-cache",
        ),
        (
            {**SMOL, "speculative": {"method": "ngram-mod", "max_tokens": 4, "min_tokens": 8}},
            "min_tokens: 8 is more",
        ),
        (
            {**SMOL, "speculative": {"draft": {"source": {"path": "/d.gguf"}, "n_gpu_layers": -1}}},
            "n_gpu_layers",
        ),
        (
            {**SMOL, "speculative": {"draft": {"source": {"path": "/d.gguf"}}, "p_min": 2}},
            "p_min: must be a number",
        ),
        (
            {**SMOL, "gpus": [0], "speculative": {"draft": {"source": {"path": "/d.gguf"}, "devices": [1]}}},
            "position 1",
        ),
        (
            {**SMOL, "speculative": {"draft": {"source": {"path": "/d.gguf"}, "cache_type_k": "q2"}}},
            "cache_type_k",
        ),
        ({**SMOL, "speculative": {"draft": {"source": {}}}}, "speculative.draft.source: give exactly one"),
        (
            {"name": "v", "engine": "vllm", "source": {"path": "/v"}, "speculative": {"method": "ngram"}},
            "vLLM needs the number of tokens",
        ),
        (
            {
                "name": "v",
                "engine": "vllm",
                "source": {"path": "/v"},
                "adapters": [{"name": "a", "source": {"hf_repo": "o/a"}}],
            },
            "give vLLM's adapters as a folder",
        ),
        (
            {
                "name": "v",
                "engine": "vllm",
                "source": {"path": "/v"},
                "speculative": {"draft": {"source": {"path": "/d"}, "devices": [0]}, "max_tokens": 2},
            },
            "draft.devices: not a known key for vllm",
        ),
    ],
)
def test_bad_sections_name_the_model_and_field(model, message):
    assert any(message in line for line in problems([model], gpu_count=1)), problems([model], gpu_count=1)


def test_an_adapter_name_may_not_be_another_models_on_the_host():
    other = {"name": "smol-pirate", "engine": "llamacpp", "source": {"path": "/srv/m/p.gguf"}}
    assert any(
        "the name smol-pirate is both" in line for line in problems([{**SMOL, "adapters": [PIRATE]}, other])
    )


def test_the_fetch_list_has_each_adapter_and_draft_under_its_own_name():
    models = [
        {**SMOL, "adapters": [PIRATE], "speculative": {"draft": {"source": {"path": "/d.gguf"}}}},
        {**SMOL, "name": "gone", "state": "absent", "adapters": [PIRATE]},
    ]
    items = fetch_list(models)
    assert [i["name"] for i in items] == ["smol", "smol+lora+smol-pirate", "smol+draft"]
    assert items[1]["source"] == PIRATE["source"]
    assert items[2]["engine"] == "llamacpp"


def test_every_host_must_list_the_same_adapters():
    endpoint = {"name": "smol", "engine": "llamacpp", "url": "http://a:1", "max_concurrency": 2}
    pirate = {**endpoint, "adapters": [{"name": "smol-pirate", "scale": 1.0}]}
    table = routing_table([("a", [pirate]), ("b", [{**pirate, "url": "http://b:1"}])])
    assert table[0]["adapters"] == [{"name": "smol-pirate", "scale": 1.0}]
    with pytest.raises(FleetError, match="host b has the adapters \\[\\], another host \\['smol-pirate'\\]"):
        routing_table([("a", [pirate]), ("b", [endpoint])])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    paths = {}
    for name, shape in (
        ("smol", "smollm2-135m"),
        ("llama1b", "llama3.2-1b"),
        ("llama8b", "llama3-8b"),
        ("smol-copy", "smollm2-135m"),
    ):
        paths[name] = folder / f"{name}.gguf"
        write_gguf(paths[name], shape, "Q4_0", fill="sparse")
    paths["tiny"] = folder / "tiny.gguf"
    write_gguf(paths["tiny"], "gemma3-tiny", "Q8_0", fill="random")
    paths["lora"] = folder / "lora.gguf"
    write_gguf_lora(paths["tiny"], paths["lora"], rank=4)
    return {name: read_gguf_info(str(path), gguf) for name, path in paths.items()}


def test_gguf_info_reads_vocabularies_and_adapters(files):
    assert files["smol"]["vocabulary"]["tokens"] == 49152
    assert files["smol"]["vocabulary"] == files["smol-copy"]["vocabulary"]
    assert files["smol"]["type"] == "model"
    assert files["lora"]["type"] == "adapter"
    assert files["lora"]["adapter_type"] == "lora"
    assert files["lora"]["lora_alpha"] == 16.0
    assert files["lora"]["vocabulary"] is None


def test_a_draft_with_another_vocabulary_is_refused_before_any_host_changes(files):
    model = {**SMOL, "speculative": {"draft": {"source": {"path": "/srv/d/llama1b.gguf"}}}}
    found = problems([model], shapes={"smol": files["smol"], "smol+draft": files["llama1b"]})
    assert any(
        "the draft's vocabulary differs from the model's (128256 tokens, not 49152" in p for p in found
    )
    # The same vocabulary passes.
    one([model], shapes={"smol": files["smol"], "smol+draft": files["smol-copy"]})


def test_vocabularies_differ_by_llamacpps_rules(files):
    vocab = files["smol"]["vocabulary"]
    assert vocabulary_mismatch(vocab, dict(vocab)) is None
    assert "tokenizer llama" in vocabulary_mismatch(vocab, {**vocab, "model": "llama"})
    # As llama.cpp: the EOS token matters only where it is added.
    assert vocabulary_mismatch(vocab, {**vocab, "eos_token_id": 7}) is None
    adds = {**vocab, "add_eos_token": True}
    assert f"EOS token 7, not {vocab['eos_token_id']}" in vocabulary_mismatch(
        adds, {**adds, "eos_token_id": 7}
    )
    assert "adds the BOS token: True, not False" in vocabulary_mismatch(
        vocab, {**vocab, "add_bos_token": True}
    )
    assert "other token texts" in vocabulary_mismatch(vocab, {**vocab, "tokens_sha256": "0" * 64})
    # A few tokens more (llama.cpp allows 128) passes the counts.
    assert (
        vocabulary_mismatch(vocab, {**vocab, "tokens": vocab["tokens"] + 100, "tokens_sha256": "x"}) is None
    )


def test_an_adapter_must_be_a_lora_adapter_of_the_models_architecture(files):
    tiny = {"name": "tiny", "engine": "llamacpp", "source": {"path": "/m/tiny.gguf"}}
    adapter = {"name": "tiny-a", "source": {"path": "/a/lora.gguf"}}
    one([{**tiny, "adapters": [adapter]}], shapes={"tiny": files["tiny"], "tiny+lora+tiny-a": files["lora"]})
    found = problems(
        [{**tiny, "adapters": [adapter]}], shapes={"tiny": files["tiny"], "tiny+lora+tiny-a": files["smol"]}
    )
    assert any("adapter tiny-a: its file is a model, not a LoRA adapter" in p for p in found)
    found = problems(
        [{**SMOL, "adapters": [adapter]}], shapes={"smol": files["smol"], "smol+lora+tiny-a": files["lora"]}
    )
    assert any("an adapter for gemma3, but the model is llama" in p for p in found)


def test_the_plan_counts_the_draft_on_the_gpus_it_is_given(files):
    gpus = [{"index": 0, "memory_total_mib": 46068}, {"index": 1, "memory_total_mib": 46068}]
    target = {
        "name": "big",
        "engine": "llamacpp",
        "source": {"path": "/m/llama8b.gguf"},
        "gpus": [0, 1],
        "llamacpp": {"ctx_size": 8192, "parallel": 2, "split_mode": "layer"},
    }
    shapes = {"big": files["llama8b"], "big+draft": files["llama1b"]}
    alone = plan(one([target], gpu_count=2, shapes=shapes), shapes, gpus)
    draft = {"draft": {"source": {"path": "/m/llama1b.gguf"}, "devices": [1]}}
    both = plan(one([{**target, "speculative": draft}], gpu_count=2, shapes=shapes), shapes, gpus)
    rows = {(r["gpu"]): r for r in both["rows"]}
    before = {(r["gpu"]): r for r in alone["rows"]}
    # The draft's weights and its KV cache at the target's context, on GPU 1 only.
    assert rows[0]["weights"] == before[0]["weights"]
    draft_weights = rows[1]["weights"] - before[1]["weights"]
    # Everything but the input embedding (host memory); its tied output is copied to the GPU.
    assert draft_weights == files["llama1b"]["tensor_bytes"]
    draft_kv = 16 * 8 * 64 * 2 * 2 * 8192  # layers x KV heads x head size x (K, V) x f16 x cells
    assert rows[1]["kv_cache"] - before[1]["kv_cache"] == draft_kv
    assert rows[1]["overhead"] == before[1]["overhead"]  # one process
    assert both["rows"][1]["need"] > alone["rows"][1]["need"] + 100 * MIB


def test_a_draft_without_a_known_shape_is_reported(files):
    gpus = [{"index": 0, "memory_total_mib": 46068}]
    target = {**SMOL, "gpus": [0], "speculative": {"draft": {"source": {"path": "/m/d.gguf"}}}}
    result = plan(one([target], gpu_count=1), {"smol": files["smol"]}, gpus)
    assert result["unknown"] == ["smol+draft"]
