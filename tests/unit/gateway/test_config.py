"""Config parsing: good configs load, and each bad one names its field."""

from __future__ import annotations

import copy

import pytest
from cortex_gateway.config import ConfigError, load_config, parse_config

from .conftest import make_config

GOOD = make_config({"m": ["http://127.0.0.1:18080"]})


def with_change(path: str, value: object) -> dict:
    raw = copy.deepcopy(GOOD)
    target = raw
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
    last = keys[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return raw


def test_good_config_loads():
    config = parse_config(GOOD)
    assert config.models["m"].backends[0].url == "http://127.0.0.1:18080"
    assert config.timeouts.first_byte == 600.0


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("listen.port", 70000, "listen.port: must be between 1 and 65535"),
        ("listen.port", True, "listen.port: expected an integer, got a boolean"),
        ("admin_listen.port", 0, "admin_listen.port: must be between 1 and 65535"),
        ("admin_listen.colour", "red", "admin_listen.colour: unknown option"),
        ("models.0.engine", "tgi", "models[0].engine: must be one of llamacpp, vllm"),
        ("models.0.name", "", "models[0].name: must not be empty"),
        ("models.0.backends", [], "models[0].backends: needs at least one backend"),
        ("models.0.backends.0.url", "127.0.0.1:8080", "models[0].backends[0].url: must be an http(s) URL"),
        (
            "models.0.backends.0.max_concurrency",
            0,
            "models[0].backends[0].max_concurrency: must be at least 1",
        ),
        ("models.0.colour", "red", "models[0].colour: unknown option"),
        ("auth.api_keys", [], "auth.api_keys: require_api_key is true but no key"),
        ("auth.api_keys.0.sha256", "abc", "auth.api_keys[0].sha256: must be 64 hex digits"),
        ("timeouts.connect", -1, "timeouts.connect: must be greater than 0"),
        ("health.unhealthy_after", 0, "health.unhealthy_after: must be at least 1"),
        ("threads", 3, "threads: unknown option"),
        ("workers", 0, "workers: must be 'auto' or a number from 1 to 256, got 0"),
        ("workers", "all", "workers: must be 'auto' or a number from 1 to 256, got 'all'"),
    ],
)
def test_bad_config_names_the_field(path, value, message):
    with pytest.raises(ConfigError) as excinfo:
        parse_config(with_change(path, value))
    assert message in str(excinfo.value)


def test_the_admin_api_listens_on_loopback_by_default_and_never_on_the_public_address():
    config = parse_config(GOOD)
    assert (config.admin_host, config.admin_port) == ("127.0.0.1", 8001)
    raw = copy.deepcopy(GOOD)
    raw["admin_listen"] = dict(raw.get("listen", {"host": "127.0.0.1", "port": 8000}))
    raw["admin_listen"].setdefault("host", "127.0.0.1")
    raw["admin_listen"].setdefault("port", 8000)
    with pytest.raises(ConfigError, match="admin_listen: the admin API needs its own address"):
        parse_config(raw)


def test_duplicate_model_names_are_refused():
    raw = copy.deepcopy(GOOD)
    raw["models"].append(copy.deepcopy(raw["models"][0]))
    with pytest.raises(ConfigError, match=r"models\[1\].name: duplicate model name 'm'"):
        parse_config(raw)


def test_unreadable_and_invalid_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
