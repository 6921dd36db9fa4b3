"""The gateway's routing table across hosts, from each host's instances."""

from __future__ import annotations

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._fleet import FleetError, routing_table
from ansible_collections.cortex.serving.plugins.module_utils._models import host_instances, instance_endpoints

CHAT = {
    "name": "chat",
    "engine": "llamacpp",
    "source": {"path": "/srv/chat.gguf"},
    "replicas": 2,
    "port": 18080,
    "llamacpp": {"parallel": 4},
}
EMBED = {"name": "embed", "engine": "llamacpp", "source": {"path": "/srv/e.gguf"}, "port": 19000}


def endpoints(models, address):
    return instance_endpoints(host_instances(models, "h", defaults={"address": address})["instances"])


def test_replicas_on_several_hosts_become_backends_in_host_order():
    table = routing_table(
        [("gpu-a", endpoints([CHAT], "10.0.0.1")), ("gpu-b", endpoints([CHAT, EMBED], "10.0.0.2"))]
    )
    assert [m["name"] for m in table] == ["chat", "embed"]
    assert [(b["host"], b["url"], b["max_concurrency"]) for b in table[0]["backends"]] == [
        ("gpu-a", "http://10.0.0.1:18080", 4),
        ("gpu-a", "http://10.0.0.1:18081", 4),
        ("gpu-b", "http://10.0.0.2:18080", 4),
        ("gpu-b", "http://10.0.0.2:18081", 4),
    ]
    assert [b["url"] for b in table[1]["backends"]] == ["http://10.0.0.2:19000"]


def test_stopped_models_are_not_routed():
    table = routing_table([("gpu-a", endpoints([CHAT, {**EMBED, "state": "stopped"}], "10.0.0.1"))])
    assert [m["name"] for m in table] == ["chat"]


def test_one_model_name_with_two_engines_is_refused():
    a = [{"name": "chat", "engine": "llamacpp", "url": "http://a:1", "max_concurrency": 1}]
    b = [{"name": "chat", "engine": "vllm", "url": "http://b:1", "max_concurrency": 1}]
    with pytest.raises(FleetError, match="model chat: host gpu-b serves it with engine vllm"):
        routing_table([("gpu-a", a), ("gpu-b", b)])


def test_a_models_gateway_timeouts_reach_the_routing_table():
    slow = {**CHAT, "timeouts": {"first_byte": 1800}}
    table = routing_table([("gpu-a", endpoints([slow, EMBED], "10.0.0.1"))])
    assert table[0]["timeouts"] == {"first_byte": 1800}
    assert table[1]["timeouts"] == {}
