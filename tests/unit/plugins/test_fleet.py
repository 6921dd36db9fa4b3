"""Endpoints per host and the gateway's routing table across hosts."""

from __future__ import annotations

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._fleet import (
    FleetError,
    model_endpoints,
    routing_table,
)

MODELS = [
    {"name": "chat", "engine": "llamacpp", "llamacpp": {"parallel": 4}},
    {"name": "embed", "engine": "llamacpp", "port": 19000},
    {"name": "big", "engine": "llamacpp"},
]


def test_ports_follow_the_list_unless_given():
    endpoints = model_endpoints(MODELS, "10.0.0.5", 18080, {"parallel": 2})
    assert [(e["name"], e["port"], e["url"]) for e in endpoints] == [
        ("chat", 18080, "http://10.0.0.5:18080"),
        ("embed", 19000, "http://10.0.0.5:19000"),
        ("big", 18082, "http://10.0.0.5:18082"),
    ]


def test_concurrency_is_the_parallel_slots():
    endpoints = model_endpoints(MODELS, "127.0.0.1", 18080, {"parallel": 2})
    assert [e["max_concurrency"] for e in endpoints] == [4, 2, 2]


def test_a_model_on_two_hosts_becomes_two_replicas():
    a = model_endpoints(MODELS[:1], "10.0.0.1", 18080)
    b = model_endpoints(MODELS[:2], "10.0.0.2", 18080)
    table = routing_table([("gpu-a", a), ("gpu-b", b)])
    assert [m["name"] for m in table] == ["chat", "embed"]
    assert [(be["host"], be["url"]) for be in table[0]["backends"]] == [
        ("gpu-a", "http://10.0.0.1:18080"),
        ("gpu-b", "http://10.0.0.2:18080"),
    ]


def test_one_model_name_with_two_engines_is_refused():
    a = [{"name": "chat", "engine": "llamacpp", "url": "http://a:1", "max_concurrency": 1}]
    b = [{"name": "chat", "engine": "vllm", "url": "http://b:1", "max_concurrency": 1}]
    with pytest.raises(FleetError, match="model chat: host gpu-b serves it with engine vllm"):
        routing_table([("gpu-a", a), ("gpu-b", b)])
