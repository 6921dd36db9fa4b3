"""What a host already holds: the stamps the role leaves beside each model's
files decide which entries are fetched again and where their shapes come from."""

from __future__ import annotations

import json

from ansible_collections.cortex.serving.plugins.module_utils._models import (
    fetch_id,
    fetch_pending,
    fetched_shapes,
)

CHAT = {
    "name": "chat",
    "engine": "llamacpp",
    "source": {"url": "file:///srv/chat.gguf", "sha256": "a" * 64},
    "llamacpp": {"ctx_size": 4096},
}
ON_HOST = {"name": "local", "engine": "vllm", "source": {"path": "/srv/models/local"}}
SHAPE = {"context_length": 8192, "size_bytes": 100}


def stamp(item: dict, shape: dict | None = None) -> str:
    return json.dumps({"name": item["name"], "id": fetch_id(item), "shape": shape or {}})


def test_an_engine_setting_keeps_the_id_and_a_source_change_or_a_token_does_not_matter_the_same_way():
    assert fetch_id(CHAT) == fetch_id({**CHAT, "llamacpp": {"ctx_size": 2048}, "replicas": 3})
    assert fetch_id(CHAT) != fetch_id({**CHAT, "source": {**CHAT["source"], "sha256": "b" * 64}})
    assert fetch_id(CHAT) != fetch_id({**CHAT, "engine": "vllm"})
    hub = {"name": "hub", "engine": "vllm", "source": {"hf_repo": "org/m", "token": "hf_secret"}}
    assert fetch_id(hub) == fetch_id({**hub, "source": {"hf_repo": "org/m", "token": "hf_other"}})


def test_only_entries_without_a_matching_stamp_are_fetched():
    other = {**CHAT, "name": "other"}
    changed = {**CHAT, "source": {**CHAT["source"], "sha256": "c" * 64}}
    stamps = [stamp(CHAT), "", "not json", stamp({**other, "source": {"url": "file:///old.gguf"}})]
    assert fetch_pending([CHAT, other], stamps) == [other]
    assert fetch_pending([changed], stamps) == [changed]
    assert fetch_pending([CHAT], []) == [CHAT]


def test_a_model_on_a_host_path_is_always_checked():
    assert fetch_pending([ON_HOST], [stamp(ON_HOST)]) == [ON_HOST]
    assert fetched_shapes([ON_HOST], [stamp(ON_HOST, SHAPE)]) == {}


def test_shapes_come_from_matching_stamps_with_the_entrys_plan_over_them():
    planned = {**CHAT, "plan": {"hf_config": {"num_hidden_layers": 30}}}
    stale = {**CHAT, "name": "stale"}
    stamps = [stamp(planned, SHAPE), json.dumps({"name": "stale", "id": "0" * 64, "shape": SHAPE})]
    assert fetched_shapes([planned, stale], stamps) == {
        "chat": {**SHAPE, "hf_config": {"num_hidden_layers": 30}}
    }
