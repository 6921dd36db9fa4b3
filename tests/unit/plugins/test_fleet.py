"""Fleet-wide views: the gateway's routing table across hosts, Prometheus targets, the fleet table."""

from __future__ import annotations

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._fleet import (
    PROXY_TIMEOUT_MARGIN,
    FleetError,
    fleet_rows,
    fleet_table,
    prometheus_targets,
    proxy_read_timeout,
    routing_table,
)
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


def test_a_models_routing_policy_reaches_the_routing_table():
    pinned = {**CHAT, "routing": {"policy": "least_outstanding"}}
    table = routing_table([("gpu-a", endpoints([pinned, EMBED], "10.0.0.1"))])
    assert table[0]["routing"] == {"policy": "least_outstanding"}
    assert table[1]["routing"] == {}  # the gateway's default


def inspected(model, replica, status="running", health="healthy", devices=None):
    info = {
        "Name": f"/cortex-{model}-{replica}",
        "Config": {
            "Labels": {
                "io.cortex.model": model,
                "io.cortex.engine": "vllm",
                "io.cortex.replica": str(replica),
            }
        },
        "State": {"Status": status, "Health": {"Status": health}},
        "HostConfig": {"DeviceRequests": [{"DeviceIDs": devices}] if devices else None},
    }
    return info


def test_fleet_table_shows_state_health_and_the_gpu_memory_of_each_container():
    gpus = [
        {"index": 0, "memory_used_mib": 40960, "memory_total_mib": 81920},
        {"index": 1, "memory_used_mib": 10240, "memory_total_mib": 81920},
    ]
    rows = fleet_rows(
        [inspected("llama", 1, devices=["1"]), inspected("llama", 0, devices=["0", "1"]),
         inspected("embed", 0, "exited", "unhealthy")],
        "h100-a", gpus,
    )  # fmt: skip
    lines = fleet_table(rows)
    assert lines[0].split() == [
        "HOST",
        "MODEL",
        "ENGINE",
        "REPLICA",
        "STATE",
        "HEALTH",
        "GPUS",
        "GPU",
        "MEMORY",
    ]
    assert lines[1].split() == ["h100-a", "embed", "vllm", "0", "exited", "unhealthy", "cpu", "-", "<-"]
    assert lines[2].split() == [
        "h100-a",
        "llama",
        "vllm",
        "0",
        "running",
        "healthy",
        "0,1",
        "50.0",
        "/",
        "160.0",
        "GiB",
    ]
    assert lines[3].split()[-4:] == ["10.0", "/", "80.0", "GiB"]
    assert lines[0].index("STATE") == lines[1].index("exited") == lines[2].index("running")  # aligned
    assert fleet_table([])[1] == "(no engine containers)"


def test_prometheus_targets_scrape_what_the_gateway_and_engines_listen_on():
    files = prometheus_targets(
        [("gw-a", "10.0.0.51", "0.0.0.0", 8000), ("gw-b", "10.0.0.52", "10.1.0.52", 8001)],  # noqa: S104
        [
            (
                "gpu-a",
                "fd00::11",
                [{"name": "m", "engine": "vllm", "replica": 1, "url": "http://[fd00::11]:18100"}],
            )
        ],
    )
    assert [g["targets"] for g in files["cortex-gateway.json"]] == [["10.0.0.51:8000"], ["10.1.0.52:8001"]]
    assert files["cortex-engines-gpu-a.json"] == [
        {
            "targets": ["[fd00::11]:18100"],
            "labels": {"host": "gpu-a", "model": "m", "engine": "vllm", "replica": "1"},
        }
    ]
    assert [g["targets"][0] for g in files["cortex-node.json"]] == [
        "[fd00::11]:9100",
        "10.0.0.51:9100",
        "10.0.0.52:9100",
    ]


def test_the_proxys_read_timeout_outlasts_every_models_own_timeouts():
    routes = [
        {"name": "big", "timeouts": {"first_byte": 900}},
        {"name": "fast", "timeouts": {"idle": 30}},
        {"name": "plain", "timeouts": {}},
    ]
    # The gateway must time out first, with its own error body, not nginx with a bare 504.
    assert proxy_read_timeout(routes, {"first_byte": 600, "idle": 120}) == 900 + PROXY_TIMEOUT_MARGIN
    assert proxy_read_timeout([], {"first_byte": 600, "idle": 1200}) == 1200 + PROXY_TIMEOUT_MARGIN


def test_a_vllm_model_scheduling_by_priority_is_marked_for_the_gateway():
    """The gateway sets each request's priority only on engines that order by
    it: a vLLM engine without --scheduling-policy priority refuses a nonzero one."""
    ranked = {
        "name": "ranked",
        "engine": "vllm",
        "source": {"path": "/srv/ranked"},
        "port": 20000,
        "vllm": {"scheduling_policy": "priority"},
    }
    plain = {**ranked, "name": "plain", "port": 20100, "vllm": {"scheduling_policy": "fcfs"}}
    table = routing_table([("gpu-a", endpoints([ranked, plain, CHAT], "10.0.0.1"))])
    assert {m["name"]: m.get("priority_scheduling", False) for m in table} == {
        "ranked": True,
        "plain": False,
        "chat": False,
    }
    commands = {i["model"]: i["command"] for i in host_instances([ranked, plain], "h")["instances"]}
    assert commands["ranked"][commands["ranked"].index("--scheduling-policy") + 1] == "priority"
    assert commands["plain"][commands["plain"].index("--scheduling-policy") + 1] == "fcfs"
