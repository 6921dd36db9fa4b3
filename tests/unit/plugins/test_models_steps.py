"""The steps of host_instances, each on its own: a plan of one host, the
entries it has checked so far, and what the step adds or reports."""

from __future__ import annotations

import pytest
from ansible_collections.cortex.serving.plugins.module_utils import _models
from ansible_collections.cortex.serving.plugins.module_utils._models import (
    BUILTIN_DEFAULTS,
    ModelsError,
    _as_list,
    _build_instances,
    _check_model,
    _check_model_fields,
    _check_pool_entries,
    _check_pools,
    _check_served_names,
    _Checked,
    _claim_explicit_ports,
    _HostPlan,
    _place_gpus,
    _pool_member,
    _replica_command,
)

SOURCE = {"url": "file:///srv/model.gguf", "sha256": "a" * 64}


def new_plan() -> _HostPlan:
    return _HostPlan("gpu-a", _models._merge(BUILTIN_DEFAULTS, None), {})


def checked(name: str, **fields: object) -> _Checked:
    values = {
        "model": {"name": name, "engine": "llamacpp", "source": SOURCE},
        "name": name,
        "engine": "llamacpp",
        "state": "started",
        "restart": "unless-stopped",
        "replicas": 1,
        "port": None,
        "per_replica": [None],
        "count": None,
        "fraction": None,
        "env": {},
    }
    values.update(fields)
    return _Checked(**values)


def test_a_list_left_out_is_empty_and_anything_else_stops_the_check_naming_the_variable():
    assert _as_list(None, "cortex_models", "model entries", "gpu-a") == []
    with pytest.raises(ModelsError) as info:
        _as_list({"name": "x"}, "cortex_model_pools", "pools", "gpu-a")
    assert info.value.problems == ["cortex_model_pools on gpu-a: must be a list of pools, got dict"]


def test_bad_common_fields_are_each_reported_and_replaced_so_the_check_goes_on():
    plan = new_plan()
    fields = _check_model_fields(
        plan,
        "m",
        "llamacpp",
        {"replicas": 0, "port": 65535, "gpu_memory_fraction": True, "env": ["A=1"], "vllm": {"x": 1}},
    )
    assert fields == {
        "state": "started",
        "restart": "unless-stopped",
        "replicas": 1,
        "port": 65535,
        "fraction": None,
        "env": {},
    }
    assert plan.problems == [
        "model m: vllm: settings for engine vllm, but the model runs on llamacpp",
        "model m: replicas: must be a whole number of 1 or more, got 0",
        "model m: gpu_memory_fraction: must be a number in (0, 1], got True",
        "model m: env: must be a mapping of names to values",
    ]


def test_a_port_too_high_for_every_replica_is_dropped():
    plan = new_plan()
    assert _check_model_fields(plan, "m", "llamacpp", {"replicas": 2, "port": 65535})["port"] is None
    assert plan.problems == ["model m: port: must be a port number (1-65535), got 65535"]


def test_a_model_named_twice_is_reported_once_and_checked_once():
    plan = new_plan()
    entry = {"name": "m", "engine": "llamacpp", "source": SOURCE}
    _check_model(plan, 0, entry)
    _check_model(plan, 1, dict(entry))
    assert [item.name for item in plan.checked] == ["m"]
    assert plan.problems == ["model m: name: declared twice on gpu-a (entries 0 and 1)"]


def test_a_pool_member_joins_its_pool_and_an_empty_pool_is_reported():
    plan = new_plan()
    _check_pools(plan, [{"name": "small"}, {"name": "idle"}])
    _check_model(plan, 0, {"name": "m", "engine": "llamacpp", "source": SOURCE, "pool": "small"})
    _check_pool_entries(plan)
    assert [(item.name, [m["name"] for m in item.model[_models._POOL]]) for item in plan.checked] == [
        ("small", ["m"])
    ]
    assert plan.problems == ["pool idle: no model of cortex_models names it in pool"]


def test_a_name_served_as_a_model_and_an_adapter_is_reported():
    plan = new_plan()
    plan.served_names = {"m": ["a model", "an adapter of base"], "base": ["a model"]}
    _check_served_names(plan)
    assert plan.problems == [
        "model m: adapters: the name m is both a model and an adapter of base on gpu-a; "
        "clients could not tell them apart"
    ]


def test_counted_gpus_take_the_lowest_ones_left_by_explicit_indices():
    plan = new_plan()
    plan.checked = [
        checked("counted", replicas=2, count=1, per_replica=[None, None]),
        checked("pinned", per_replica=[[0]]),
    ]
    _place_gpus(plan, 4)
    assert plan.problems == []
    assert plan.checked[0].per_replica == [[1], [2]]
    assert plan.checked[1].per_replica == [[0]]


def test_gpus_that_are_missing_or_held_twice_are_reported():
    plan = new_plan()
    plan.checked = [
        checked("a", per_replica=[[0]]),
        checked("b", per_replica=[[0]], fraction=0.5),
        checked("c", count=2),
        checked("d", per_replica=[[3]]),
    ]
    _place_gpus(plan, 2)
    assert plan.problems == [
        "model d: gpus: GPU 3 does not exist on gpu-a, which has 2 GPU(s): 0-1",
        "model c: gpus: 2 GPU(s) per replica wanted, but only 1 of gpu-a's 2 are unclaimed",
        "model a: gpus: GPU 0 on gpu-a is claimed by a and b; models share a GPU only when each sets "
        "gpu_memory_fraction",
    ]
    assert plan.checked[2].per_replica == [[]]


def test_shared_fractions_that_overfill_a_gpu_are_reported():
    plan = new_plan()
    plan.checked = [
        checked("a", per_replica=[[0]], fraction=0.6),
        checked("b", per_replica=[[0]], fraction=0.5),
    ]
    _place_gpus(plan, 1)
    assert plan.problems == [
        "model a: gpu_memory_fraction: the models sharing GPU 0 on gpu-a (a, b) ask for 1.10 of it in all"
    ]


def test_explicit_ports_are_claimed_per_replica_and_a_clash_names_the_holder():
    plan = new_plan()
    plan.checked = [
        checked("a", replicas=2, port=18100),
        checked("b", port=18101),
        checked("gone", state="absent"),
    ]
    _claim_explicit_ports(plan)
    assert plan.taken == {18100: "a (replica 0)", 18101: "b"}
    assert plan.problems == ["model b: port: 18101 is also the port of a (replica 1) on gpu-a"]


def test_instances_step_around_claimed_ports_and_absent_models_are_listed_apart():
    plan = new_plan()
    plan.checked = [checked("a", port=18080), checked("auto"), checked("gone", state="absent")]
    _claim_explicit_ports(plan)
    instances = _build_instances(plan)
    assert [i["container"] for i in instances] == ["cortex-a-0", "cortex-auto-0"]
    assert instances[0]["port"] == 18080
    assert instances[1]["port"] != 18080
    assert plan.absent == ["gone"]
    assert plan.problems == []


def test_a_pipeline_on_cpus_is_compiled_and_eager_mode_is_reported():
    plan = new_plan()
    node = {"nnodes": 2, "rank": 0, "master_addr": "10.0.0.1", "master_port": 29500, "hosts": []}
    plan.spans["pp"] = node
    model = {"name": "pp", "engine": "vllm", "source": {"hf_repo": "org/m"}, "vllm": {"enforce_eager": True}}
    item = checked("pp", model=model, engine="vllm")
    entry = {
        **model,
        "gpus": [],
        "model_file": None,
        "vllm": {"pipeline_parallel_size": 2, "enforce_eager": True},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_models, "multinode_args", lambda _node: ["--nnodes", "2"])
        patch.setattr(_models, "check_layout", lambda *args: None)
        command = _replica_command(plan, item, entry, 18300, {})
    assert entry["vllm"]["enforce_eager"] is False
    assert "--enforce-eager" not in command
    assert command[-2:] == ["--nnodes", "2"]
    assert plan.problems == [
        "model pp: vllm.enforce_eager: pipeline parallelism on CPUs crashes in eager mode; "
        "leave it out (the ranks compile their graphs)"
    ]


def test_a_pool_member_gets_its_preset_section_mounts_and_a_load_timeout_from_its_size():
    cfg = _models._merge(BUILTIN_DEFAULTS, None)
    pool = {"name": "small", "idle_unload_seconds": 300, "load_timeout": None}
    on_host = {"name": "a", "source": {"path": "/srv/gguf/a.gguf"}, "preload": True}
    fetched = {"name": "b", "source": {"url": "https://example.invalid/b.gguf", "token": "secret"}}
    shape = {"size_bytes": 4 * 1024**3, "context_length": 2048}

    member, section, mounts = _pool_member(pool, on_host, [], shape, cfg)
    assert member["preload"] is True
    assert member["idle_unload_seconds"] == 300
    assert mounts[0] == {"type": "bind", "source": "/srv/gguf", "target": "/models/a", "read_only": True}
    assert "[a]" in section
    assert "--ctx-size" in " ".join(member["command"])
    # A bigger file waits longer to load than a small one.
    small = _pool_member(pool, on_host, [], {"size_bytes": 1024}, cfg)[0]
    assert member["load_timeout"] > small["load_timeout"]

    member, _section, mounts = _pool_member(dict(pool, load_timeout=42), fetched, [], {}, cfg)
    assert member["load_timeout"] == 42
    assert member["preload"] is False
    assert mounts[0]["source"] == cfg["models_dir"].rstrip("/") + "/b"
    # The pool's identity and what the gateway reads never carry the token.
    assert "token" not in member["source"]
