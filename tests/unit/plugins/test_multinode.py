"""vLLM models that span hosts: each host's rank rendered from one
declaration, checked against the pinned vLLM's parser, and every bad layout
named before any host changes."""

from __future__ import annotations

import copy

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._models import (
    ModelsError,
    headless_endpoints,
    host_instances,
    instance_endpoints,
)

from .test_pools import healthcheck_config, load_healthcheck
from .vllm_parser import parse

HF_CONFIG = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
SPANNING = {
    "name": "smollm2-pp",
    "engine": "vllm",
    "source": {"path": "/srv/models/smollm2"},
    "vllm": {"pipeline_parallel_size": 2, "dtype": "float32"},
    "multinode": {
        "hosts": [{"host": "node-a", "address": "10.1.0.10"}, {"host": "node-b", "address": "10.1.0.11"}],
        "master_port": 29501,
    },
    "plan": {"hf_config": HF_CONFIG},
}
ONE_NIC = {"interfaces": ["lo", "eth0", "docker0", "veth1a2b"]}


def rank(host: str, model=None, gpu_count=0, defaults=None) -> dict:
    return host_instances([model or SPANNING], host, gpu_count, defaults or ONE_NIC)["instances"][0]


def problems(model, host="node-a", gpu_count=0, defaults=None) -> list[str]:
    with pytest.raises(ModelsError) as error:
        host_instances([model], host, gpu_count, defaults or ONE_NIC)
    return error.value.problems


def changed(**sections):
    model = copy.deepcopy(SPANNING)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(model.get(key), dict):
            model[key].update(value)
        else:
            model[key] = value
    return model


def test_rank_zero_serves_the_api_and_the_others_run_headless():
    first, second = rank("node-a"), rank("node-b")
    common = ["--nnodes", "2", "--master-addr", "10.1.0.10", "--master-port", "29501"]
    for flag, value in zip(common[::2], common[1::2], strict=True):
        assert first["command"][first["command"].index(flag) + 1] == value
        assert second["command"][second["command"].index(flag) + 1] == value
    assert first["command"][first["command"].index("--node-rank") + 1] == "0"
    assert second["command"][second["command"].index("--node-rank") + 1] == "1"
    assert "--headless" not in first["command"]
    assert second["command"][-1] == "--headless"
    assert first["command"][first["command"].index("--distributed-executor-backend") + 1] == "mp"
    # Both parse with the pinned vLLM's own option table.
    for instance in (first, second):
        parsed = parse([*instance["command"], "--api-key", "k"])
        assert parsed.nnodes == 2
        assert parsed.pipeline_parallel_size == 2
    assert parse(second["command"]).headless is True


def test_each_rank_shares_its_hosts_network_with_its_own_address_and_interface():
    first, second = rank("node-a"), rank("node-b")
    assert first["network_mode"] == second["network_mode"] == "host"
    assert first["env"]["VLLM_HOST_IP"] == "10.1.0.10"
    assert second["env"]["VLLM_HOST_IP"] == "10.1.0.11"
    assert second["env"]["GLOO_SOCKET_IFNAME"] == second["env"]["NCCL_SOCKET_IFNAME"] == "eth0"
    # The API on the role's address and the model's port, on the host itself.
    assert first["command"][first["command"].index("--host") + 1] == "127.0.0.1"
    assert first["command"][first["command"].index("--port") + 1] == str(first["port"])
    assert first["container_port"] == first["port"]
    assert str(first["port"]) in first["healthcheck"]["test"][-1]
    # Docker never restarts a rank alone; the health-check timer restarts the group.
    assert first["restart_policy"] == second["restart_policy"] == "no"
    assert second["headless"] is True
    assert second["healthcheck"] == {"test": ["NONE"]}
    # Engines on loopback: the waiting rank's host cannot see the group's API.
    assert second["group_url"] is None
    internal = rank("node-b", defaults={**ONE_NIC, "address": "10.1.0.11"})
    assert internal["group_url"] == f"http://10.1.0.10:{first['port']}"


def test_only_rank_zero_is_routed_and_every_rank_has_the_groups_identity():
    first, second = rank("node-a"), rank("node-b")
    assert [e["name"] for e in instance_endpoints([first])] == ["smollm2-pp"]
    assert instance_endpoints([second]) == []
    assert first["group"]["id"] == second["group"]["id"]
    # A change to the model changes every rank's identity (every rank is replaced).
    other = rank("node-b", changed(vllm={"max_model_len": 1024}))
    assert other["group"]["id"] != second["group"]["id"]


def test_the_operators_network_settings_reach_every_rank():
    model = changed(multinode={"interface": "ib0", "env": {"NCCL_IB_HCA": "mlx5_0", "NCCL_IB_DISABLE": 0}})
    second = rank("node-b", model, defaults={"interfaces": ["lo", "eth0", "ib0"]})
    assert second["env"]["GLOO_SOCKET_IFNAME"] == "ib0"
    assert second["env"]["NCCL_IB_HCA"] == "mlx5_0"
    assert second["env"]["NCCL_IB_DISABLE"] == "0"


def test_gpus_per_host_times_hosts_are_the_ranks():
    model = changed(gpus=8, vllm={"tensor_parallel_size": 8, "pipeline_parallel_size": 2})
    model["plan"] = {"parameter_count": 405e9}
    first = rank("node-a", model, gpu_count=8)
    assert first["gpus"] == list(range(8))
    parsed = parse([*first["command"], "--api-key", "k"])
    assert (parsed.tensor_parallel_size, parsed.pipeline_parallel_size) == (8, 2)


def test_the_ray_backend_starts_a_ray_node_per_host_and_serves_from_the_head():
    model = changed(multinode={"backend": "ray"})
    head, worker = rank("node-a", model), rank("node-b", model)
    assert head["command"][head["command"].index("--distributed-executor-backend") + 1] == "ray"
    assert "--nnodes" not in head["command"]
    parse([*head["command"], "--api-key", "k"])
    script = head["entrypoint"][2]
    assert script.startswith("ray start --head --node-ip-address 10.1.0.10 --port 6379")
    assert "ray status" in script
    assert 'exec vllm serve "$@"' in script
    assert worker["entrypoint"] == [
        "ray", "start", "--address", "10.1.0.10:6379", "--node-ip-address", "10.1.0.11", "--block",
    ]  # fmt: skip
    assert worker["command"] == []


@pytest.mark.parametrize(
    ("sections", "host", "gpu_count", "defaults", "message"),
    [
        ({"vllm": {"pipeline_parallel_size": 2},
          "plan": {"hf_config": {**HF_CONFIG, "num_hidden_layers": 1}}},
         "node-a", 0, ONE_NIC, "vllm.pipeline_parallel_size: 2 stages for 1 layers"),
        ({"vllm": {"tensor_parallel_size": 2, "pipeline_parallel_size": 1}}, "node-a", 0, ONE_NIC,
         "vllm.tensor_parallel_size: 2 ranks do not divide the 9 attention heads"),
        ({"vllm": {"pipeline_parallel_size": 3}}, "node-a", 0, ONE_NIC,
         "on CPUs each host runs one rank: 1 x 3 = 3 ranks for 2 hosts"),
        ({"gpus": 4, "vllm": {"tensor_parallel_size": 4, "pipeline_parallel_size": 1}}, "node-a", 4, ONE_NIC,
         "1 = 4 ranks, but 2 hosts with 4 GPU(s) each have 8"),
        ({"gpus": [0, 1]}, "node-a", 1, ONE_NIC, "GPU 1 does not exist on node-a"),
        ({}, "node-c", 0, ONE_NIC, "multinode.hosts: node-c serves the model but is not one of"),
        ({}, "node-a", 0, {"interfaces": ["lo", "eth0", "eth1"]},
         "multinode.interface: node-a has several network interfaces (eth0, eth1); name the one"),
        ({"multinode": {"interface": "ib0"}}, "node-a", 0, ONE_NIC,
         "multinode.interface: node-a has no interface ib0"),
        ({"multinode": {"backend": "deepspeed"}}, "node-a", 0, ONE_NIC,
         "multinode.backend: must be one of multinode, ray"),
        ({"multinode": {"hosts": [{"host": "node-a", "address": "10.1.0.10"}]}}, "node-a", 0, ONE_NIC,
         "multinode.hosts: list the model's hosts in rank order, two or more"),
        ({"multinode": {"hosts": [{"host": "node-a", "address": "10.1.0.10"}, {"host": "node-b"}]}},
         "node-a", 0, ONE_NIC, "multinode.hosts[1]: give host (its inventory name) and address"),
        ({"multinode": {"hosts": [{"host": "node-a", "address": "10.1.0.10"},
                                  {"host": "node-b", "address": "10.1.0.10"}]}},
         "node-a", 0, ONE_NIC, "multinode.hosts: two hosts have the same address"),
        ({"multinode": {"master_port": 70000}}, "node-a", 0, ONE_NIC,
         "multinode.master_port: must be a port number"),
        ({"multinode": {"nodes": 2}}, "node-a", 0, ONE_NIC, "multinode.nodes: not a multinode setting"),
        ({"replicas": 2}, "node-a", 0, ONE_NIC, "replicas: a model that spans hosts runs one rank per host"),
        ({"engine": "llamacpp", "source": {"path": "/m/x.gguf"}, "vllm": None}, "node-a", 0, ONE_NIC,
         "multinode: only vLLM models span hosts"),
    ],
)  # fmt: skip
def test_a_bad_layout_or_network_is_named_before_any_host_changes(
    sections, host, gpu_count, defaults, message
):
    model = changed(**sections)
    model = {k: v for k, v in model.items() if v is not None}
    found = problems(model, host, gpu_count, defaults)
    assert any(message in line for line in found), found


def test_the_health_check_never_restarts_one_rank_of_a_group_alone(tmp_path, monkeypatch):
    healthcheck = load_healthcheck()
    restarted, logged = [], []

    def down(engine, config, run, now):
        return {
            "engine": engine,
            "up": 0,
            "latency": None,
            "probe_ok": None,
            "starting": False,
            "problem": "down",
        }

    monkeypatch.setattr(healthcheck, "check_engine", down)
    monkeypatch.setattr(healthcheck, "restart", lambda container: restarted.append(container) or (True, ""))
    monkeypatch.setattr(healthcheck, "log", lambda level, message: logged.append(message))
    solo = host_instances([{"name": "solo", "engine": "llamacpp", "source": {"path": "/m/x.gguf"}}], "h", 0)
    # Rank 0's host; the waiting rank's host is checked the same way (the next loop).
    engines = instance_endpoints(solo["instances"]) + instance_endpoints([rank("node-a")])
    config = healthcheck_config(tmp_path, engines, restart_after=1)
    assert healthcheck.run_once(config, now=1000.0) == 1
    # The model of one host is restarted; the group's rank is not, and the log says what to run.
    assert restarted == ["cortex-solo-0"]
    assert sum("run playbooks/models.yml" in line for line in logged) == 1
    config.update(engines=headless_endpoints([rank("node-b")]), state_file=str(tmp_path / "other.json"))
    assert healthcheck.run_once(config, now=1000.0) == 1
    assert restarted == ["cortex-solo-0"]
    assert sum("run playbooks/models.yml" in line for line in logged) == 2


def test_vllm_on_cpus_that_compiles_gets_a_cache_it_may_execute_from():
    first = rank("node-a")
    # The /tmp tmpfs is noexec: compiled code loaded from there failed. A tmpfs
    # "mode" is lost when Docker starts the container again; its owner is not.
    assert first["tmpfs"] == ["/tmp", "/var/cache/cortex-compile:exec,uid=10001,gid=10001"]  # noqa: S108
    assert first["env"]["VLLM_CACHE_ROOT"] == "/var/cache/cortex-compile/vllm"
    assert "--enforce-eager" not in first["command"]
    eager = {"name": "eager", "engine": "vllm", "source": {"path": "/m"}, "vllm": {"enforce_eager": True}}
    (alone,) = host_instances([eager], "h", 0)["instances"]
    assert alone["tmpfs"] == ["/tmp"]  # noqa: S108
    assert "VLLM_CACHE_ROOT" not in alone["env"]


def test_pipeline_parallelism_on_cpus_is_never_eager():
    found = problems(changed(vllm={"enforce_eager": True}))
    assert any(
        "vllm.enforce_eager: pipeline parallelism on CPUs crashes in eager mode" in p for p in found
    ), found


@pytest.mark.parametrize(
    "gateway_only",
    [
        {"routing": {"policy": "prefix_affinity"}},
        {"timeouts": {"first_byte": 900}},
        {"restart_policy": "always"},
        {"state": "started"},
    ],
)
def test_a_gateway_only_change_keeps_the_groups_identity(gateway_only):
    """Defect 10: the identity digested the whole entry, so tuning a timeout
    of a model over several hosts stopped every rank on every host."""
    assert rank("node-a", changed(**gateway_only))["group"]["id"] == rank("node-a")["group"]["id"]


@pytest.mark.parametrize(
    "engine_change",
    [
        {"vllm": {"max_model_len": 1024}},
        {"source": {"path": "/srv/models/other"}},
        {"env": {"NCCL_DEBUG": "INFO"}},
        {"multinode": {"master_port": 29600}},
        {"health_timeout": 900},
    ],
)
def test_what_reaches_the_ranks_changes_the_groups_identity(engine_change):
    assert rank("node-a", changed(**engine_change))["group"]["id"] != rank("node-a")["group"]["id"]
