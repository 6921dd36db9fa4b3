"""The gateway's configuration: YAML rendered by the `gateway` role.

Parsing is strict, and every error names the field that is wrong
(`models[1].backends[0].url: ...`), so a bad inventory is caught by
`cortex-gateway check-config` before the role restarts anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .policies import (
    BUILTIN_PRIORITIES,
    POLICIES,
    STANDARD,
    AffinitySettings,
    BreakerPolicy,
    FlowClass,
    FlowPolicy,
    KeyFlow,
    KeyPolicy,
    QueuePolicy,
    RoutingPolicy,
)

ENGINES = ("llamacpp", "vllm")
HEALTH_PROBES = ("completion", "embedding")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


# A non-streamed answer is read whole before it is relayed; embeddings of
# large batches run to tens of MiB.
DEFAULT_MAX_ANSWER_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    # Non-streaming engines send their headers only when the completion is
    # done, so the first byte can take as long as the whole generation.
    first_byte: float = 600.0
    idle: float = 120.0


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str
    api_key: str | None
    max_concurrency: int
    # The pool (llama-server in router mode) this backend is, where the model
    # is loaded on demand; None: the model is always resident there.
    pool: str | None = None
    max_resident: int = 0


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """A LoRA adapter served as a model name of its own, on its parent's replicas."""

    name: str
    parent: str
    scale: float = 1.0
    # Its id on llama.cpp engines: its place in the parent's list.
    index: int = 0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    engine: str
    owned_by: str
    backends: tuple[BackendConfig, ...]
    # This model's own timeouts, over the gateway's (a big model's first byte
    # can take minutes; an embedding model's should not).
    timeouts: Mapping[str, float] = field(default_factory=dict)
    # How a chat or completion request picks a replica (embeddings always go
    # to the least loaded one: there is no prompt to reuse).
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    # LoRA adapters on this model, in the engine's order.
    adapters: tuple[AdapterConfig, ...] = ()
    # Seconds a request waits for the model to load on a pool backend (0: the
    # model has no pool backend: it is always resident).
    load_timeout: float = 0.0
    # How the health monitor checks it beyond /health: "completion" or
    # "embedding" sends a 1-token request (a model whose engine spans hosts:
    # its /health sees only the first host's process); None: /health alone.
    health_probe: str | None = None
    # A vLLM engine started with --scheduling-policy priority: each request
    # carries its key's class priority (the gateway sets it; a client's own
    # is replaced).
    priority_scheduling: bool = False

    def lora_field(self, adapter: AdapterConfig | None) -> list[dict[str, float]] | None:
        """The `lora` field a llama.cpp request carries: every adapter of the
        model at 0 but the one asked for (None: the body goes as it came)."""
        if self.engine != "llamacpp" or not self.adapters:
            return None
        return [
            {"id": a.index, "scale": a.scale if adapter is not None and a.name == adapter.name else 0.0}
            for a in self.adapters
        ]


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str
    port: int
    require_api_key: bool
    # sha256 hex of each client key -> the key's name (never the key itself)
    api_keys: Mapping[str, str]
    models: Mapping[str, ModelConfig]
    timeouts: Timeouts
    max_body_bytes: int
    health_interval: float
    unhealthy_after: int
    # sha256 hex of each admin key -> its name; admin keys guard /admin/*.
    admin_keys: Mapping[str, str] = field(default_factory=dict)
    # The admin API's own listener (never the public one): loopback by default.
    admin_host: str = "127.0.0.1"
    admin_port: int = 8001
    # Per client key name: allowed models and limits (keys without one are unlimited).
    key_policies: Mapping[str, KeyPolicy] = field(default_factory=dict)
    # Where usage records go: a SQLite file, or a PostgreSQL DSN that several
    # gateways share; neither keeps no records.
    usage_path: str | None = None
    usage_postgres_dsn: str | None = None
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    queue: QueuePolicy = field(default_factory=QueuePolicy)
    # The largest non-streamed answer the gateway holds in memory to relay.
    max_answer_bytes: int = 0
    # Worker processes sharing the port (SO_REUSEPORT); "auto" in the file means
    # one per CPU this process may run on.
    workers: int = 1
    # Prefix affinity's index and keys, for every model whose policy uses it.
    affinity: AffinitySettings = field(default_factory=AffinitySettings)
    # Every adapter of every model, by the name clients ask for.
    adapters: Mapping[str, AdapterConfig] = field(default_factory=dict)
    # The queues' order: priority classes and each key's class and weight
    # (a key not named here is in the default class with weight 1).
    flow: FlowPolicy = field(default_factory=FlowPolicy)
    key_flows: Mapping[str, KeyFlow] = field(default_factory=dict)

    def key_flow(self, key_name: str | None) -> tuple[FlowClass, float]:
        """A key's class and weight (no key: the default class)."""
        own = self.key_flows.get(key_name) if key_name is not None else None
        return self.flow.named(own.flow_class if own else self.flow.default_class), own.weight if own else 1.0

    def served(self, name: str) -> tuple[str, AdapterConfig | None]:
        """The model whose replicas serve ``name``, and the adapter it names, if any."""
        adapter = self.adapters.get(name)
        return (adapter.parent, adapter) if adapter is not None else (name, None)

    def timeouts_for(self, model: str) -> Timeouts:
        """The gateway's timeouts with the model's own over them."""
        own = self.models[model].timeouts if model in self.models else None
        return replace(self.timeouts, **own) if own else self.timeouts


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a port of `true` is still a mistake.
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{where}: expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kinds):
        raise ConfigError(f"{where}: expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
    }
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _positive(value: Any, where: str) -> float:
    number = float(_expect(value, (int, float), where))
    if number <= 0:
        raise ConfigError(f"{where}: must be greater than 0, got {value}")
    return number


def _no_unknown(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown option (allowed: {', '.join(sorted(allowed))})")


def _backend(raw: Any, where: str) -> BackendConfig:
    _expect(raw, dict, where)
    _no_unknown(raw, {"url", "api_key", "max_concurrency", "pool"}, where)
    url = _expect(raw.get("url"), str, f"{where}.url")
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"{where}.url: must be an http(s) URL with a host, got {url!r}")
    api_key = raw.get("api_key")
    if api_key is not None:
        _expect(api_key, str, f"{where}.api_key")
    concurrency = _expect(raw.get("max_concurrency", 4), int, f"{where}.max_concurrency")
    if concurrency < 1:
        raise ConfigError(f"{where}.max_concurrency: must be at least 1, got {concurrency}")
    pool, max_resident = None, 0
    if raw.get("pool") is not None:
        pool_raw = _expect(raw["pool"], dict, f"{where}.pool")
        _no_unknown(pool_raw, {"name", "max_resident"}, f"{where}.pool")
        pool = _expect(pool_raw.get("name"), str, f"{where}.pool.name")
        if not pool:
            raise ConfigError(f"{where}.pool.name: must not be empty")
        max_resident = _expect(pool_raw.get("max_resident", 1), int, f"{where}.pool.max_resident")
        if max_resident < 1:
            raise ConfigError(f"{where}.pool.max_resident: must be at least 1, got {max_resident}")
    return BackendConfig(
        url=url.rstrip("/"),
        api_key=api_key or None,
        max_concurrency=concurrency,
        pool=pool,
        max_resident=max_resident,
    )


def _model(raw: Any, where: str) -> ModelConfig:
    _expect(raw, dict, where)
    _no_unknown(
        raw,
        {
            "name",
            "engine",
            "owned_by",
            "backends",
            "timeouts",
            "routing",
            "adapters",
            "load_timeout",
            "health_probe",
            "priority_scheduling",
        },
        where,
    )
    name = _expect(raw.get("name"), str, f"{where}.name")
    if not name:
        raise ConfigError(f"{where}.name: must not be empty")
    engine = _expect(raw.get("engine"), str, f"{where}.engine")
    if engine not in ENGINES:
        raise ConfigError(f"{where}.engine: must be one of {', '.join(ENGINES)}, got {engine!r}")
    owned_by = _expect(raw.get("owned_by", "cortex"), str, f"{where}.owned_by")
    backends_raw = _expect(raw.get("backends"), list, f"{where}.backends")
    if not backends_raw:
        raise ConfigError(f"{where}.backends: needs at least one backend")
    backends = tuple(_backend(b, f"{where}.backends[{i}]") for i, b in enumerate(backends_raw))
    timeouts_raw = _expect(raw.get("timeouts", {}), dict, f"{where}.timeouts")
    _no_unknown(timeouts_raw, {"connect", "first_byte", "idle"}, f"{where}.timeouts")
    timeouts = {k: _positive(v, f"{where}.timeouts.{k}") for k, v in timeouts_raw.items()}
    adapters = []
    for i, entry in enumerate(_expect(raw.get("adapters", []), list, f"{where}.adapters")):
        at = f"{where}.adapters[{i}]"
        _expect(entry, dict, at)
        _no_unknown(entry, {"name", "scale"}, at)
        adapter_name = _expect(entry.get("name"), str, f"{at}.name")
        if not adapter_name:
            raise ConfigError(f"{at}.name: must not be empty")
        scale = _positive(entry.get("scale", 1.0), f"{at}.scale")
        adapters.append(AdapterConfig(name=adapter_name, parent=name, scale=scale, index=i))
    pooled = any(b.pool for b in backends)
    if pooled and engine != "llamacpp":
        raise ConfigError(
            f"{where}.backends: a pool backend is llama-server's router; the engine must be llamacpp"
        )
    load_timeout = 0.0
    if "load_timeout" in raw or pooled:
        load_timeout = _positive(raw.get("load_timeout", 120), f"{where}.load_timeout")
    probe = raw.get("health_probe")
    if probe is not None and probe not in HEALTH_PROBES:
        raise ConfigError(f"{where}.health_probe: must be one of {', '.join(HEALTH_PROBES)}, got {probe!r}")
    priority_scheduling = _expect(raw.get("priority_scheduling", False), bool, f"{where}.priority_scheduling")
    if priority_scheduling and engine != "vllm":
        raise ConfigError(
            f"{where}.priority_scheduling: only vLLM engines schedule by priority, this one is {engine}"
        )
    return ModelConfig(
        name=name,
        engine=engine,
        owned_by=owned_by,
        backends=backends,
        timeouts=timeouts,
        routing=_routing_policy(raw.get("routing", {}), f"{where}.routing"),
        adapters=tuple(adapters),
        load_timeout=load_timeout,
        health_probe=probe,
        priority_scheduling=priority_scheduling,
    )


def _routing_policy(raw: Any, where: str) -> RoutingPolicy:
    _expect(raw, dict, where)
    _no_unknown(raw, {"policy", "spill_absolute", "spill_relative", "home_wait"}, where)
    defaults = RoutingPolicy()
    policy = _expect(raw.get("policy", defaults.policy), str, f"{where}.policy")
    if policy not in POLICIES:
        raise ConfigError(f"{where}.policy: must be one of {', '.join(POLICIES)}, got {policy!r}")
    absolute = _expect(raw.get("spill_absolute", defaults.spill_absolute), int, f"{where}.spill_absolute")
    if absolute < 1:
        raise ConfigError(f"{where}.spill_absolute: must be at least 1, got {absolute}")
    relative = _positive(raw.get("spill_relative", defaults.spill_relative), f"{where}.spill_relative")
    if relative < 1:
        raise ConfigError(f"{where}.spill_relative: must be at least 1, got {relative}")
    home_wait = float(_expect(raw.get("home_wait", defaults.home_wait), (int, float), f"{where}.home_wait"))
    if home_wait < 0:
        raise ConfigError(f"{where}.home_wait: must be 0 or more, got {home_wait}")
    return RoutingPolicy(policy=policy, spill_absolute=absolute, spill_relative=relative, home_wait=home_wait)


def _affinity(raw: Any) -> AffinitySettings:
    _expect(raw, dict, "routing")
    _no_unknown(raw, {"index_entries", "prefix_bytes", "block_bytes", "session_header"}, "routing")
    defaults = AffinitySettings()
    values: dict[str, Any] = {}
    for name, low in (("index_entries", 1024), ("prefix_bytes", 64), ("block_bytes", 16)):
        value = _expect(raw.get(name, getattr(defaults, name)), int, f"routing.{name}")
        if value < low:
            raise ConfigError(f"routing.{name}: must be at least {low}, got {value}")
        values[name] = value
    if values["block_bytes"] > values["prefix_bytes"]:
        raise ConfigError(
            f"routing.block_bytes: must not exceed routing.prefix_bytes ({values['prefix_bytes']}),"
            f" got {values['block_bytes']}"
        )
    header = _expect(raw.get("session_header", defaults.session_header), str, "routing.session_header")
    if not re.fullmatch(r"[A-Za-z0-9-]+", header):
        raise ConfigError(f"routing.session_header: must be an HTTP header name, got {header!r}")
    return AffinitySettings(session_header=header, **values)


def _keys(
    auth: Mapping[str, Any], section: str, with_policies: bool = False
) -> tuple[dict[str, str], dict[str, KeyPolicy], dict[str, tuple[Any, float, str]]]:
    keys: dict[str, str] = {}
    policies: dict[str, KeyPolicy] = {}
    # Per key: its priority as written (a class name or a number), its weight, where.
    flows: dict[str, tuple[Any, float, str]] = {}
    allowed = (
        {"name", "sha256", "models", "limits", "priority", "weight"} if with_policies else {"name", "sha256"}
    )
    for i, entry in enumerate(_expect(auth.get(section, []), list, f"auth.{section}")):
        where = f"auth.{section}[{i}]"
        _expect(entry, dict, where)
        _no_unknown(entry, allowed, where)
        key_name = _expect(entry.get("name"), str, f"{where}.name")
        digest = _expect(entry.get("sha256"), str, f"{where}.sha256").lower()
        if not _SHA256_HEX.match(digest):
            raise ConfigError(f"{where}.sha256: must be 64 hex digits (cortex-gateway hash-key makes one)")
        if key_name in keys.values():
            raise ConfigError(f"{where}.name: another key is named {key_name!r} already")
        keys[digest] = key_name
        if "models" in entry or "limits" in entry:
            policies[key_name] = _policy(entry, where)
        if "priority" in entry or "weight" in entry:
            priority = entry.get("priority", STANDARD)
            if isinstance(priority, bool) or not isinstance(priority, (str, int)):
                raise ConfigError(f"{where}.priority: expected a class name or an integer, got {priority!r}")
            flows[key_name] = (priority, _positive(entry.get("weight", 1), f"{where}.weight"), where)
    return keys, policies, flows


def _policy(entry: Mapping[str, Any], where: str) -> KeyPolicy:
    models = None
    if entry.get("models") is not None:
        models = frozenset(
            _expect(m, str, f"{where}.models[{j}]")
            for j, m in enumerate(_expect(entry["models"], list, f"{where}.models"))
        )
    limits = _expect(entry.get("limits", {}), dict, f"{where}.limits")
    names = ("requests_per_minute", "tokens_per_minute", "concurrent_streams")
    _no_unknown(limits, set(names), f"{where}.limits")
    values = {}
    for name in names:
        if limits.get(name) is not None:
            value = _expect(limits[name], int, f"{where}.limits.{name}")
            if value < 1:
                raise ConfigError(f"{where}.limits.{name}: must be at least 1, got {value}")
            values[name] = value
    return KeyPolicy(models=models, **values)


def _flow(
    raw: Any, key_priorities: Mapping[str, tuple[Any, float, str]], max_wait: float
) -> tuple[FlowPolicy, dict[str, KeyFlow]]:
    """The priority classes (the built-in ones, redefined or added to by the
    file) and each key's class: a key's integer priority is the class of that
    priority, or a class of its own."""
    _expect(raw, dict, "flow")
    _no_unknown(raw, {"enabled", "default_class", "classes"}, "flow")
    enabled = _expect(raw.get("enabled", True), bool, "flow.enabled")
    classes = {name: FlowClass(name, priority, max_wait) for name, priority in BUILTIN_PRIORITIES.items()}
    for i, entry in enumerate(_expect(raw.get("classes", []), list, "flow.classes")):
        at = f"flow.classes[{i}]"
        _expect(entry, dict, at)
        _no_unknown(entry, {"name", "priority", "max_wait", "reserved_slots"}, at)
        name = _expect(entry.get("name"), str, f"{at}.name")
        if not name:
            raise ConfigError(f"{at}.name: must not be empty")
        builtin = classes.get(name) if name in BUILTIN_PRIORITIES else None
        if "priority" not in entry and builtin is None:
            raise ConfigError(f"{at}.priority: a class of your own needs a priority (lower is served first)")
        priority = _expect(entry.get("priority", builtin.priority if builtin else 0), int, f"{at}.priority")
        reserved = _expect(entry.get("reserved_slots", 0), int, f"{at}.reserved_slots")
        if reserved < 0:
            raise ConfigError(f"{at}.reserved_slots: must be 0 or more, got {reserved}")
        classes[name] = FlowClass(
            name, priority, _positive(entry.get("max_wait", max_wait), f"{at}.max_wait"), reserved
        )
    by_priority: dict[int, str] = {}
    for flow_class in classes.values():
        other = by_priority.setdefault(flow_class.priority, flow_class.name)
        if other != flow_class.name:
            raise ConfigError(
                f"flow.classes: {flow_class.name!r} and {other!r} have the same priority"
                f" {flow_class.priority}"
            )
    default_class = _expect(raw.get("default_class", STANDARD), str, "flow.default_class")
    if default_class not in classes:
        raise ConfigError(
            f"flow.default_class: {default_class!r} is not a class (classes: {', '.join(classes)})"
        )
    key_flows: dict[str, KeyFlow] = {}
    for key_name, (priority, weight, where) in key_priorities.items():
        if isinstance(priority, int):
            name = by_priority.get(priority) or str(priority)
            classes.setdefault(name, FlowClass(name, priority, max_wait))
        elif priority not in classes:
            raise ConfigError(
                f"{where}.priority: {priority!r} is not a class (classes: {', '.join(classes)})"
            )
        else:
            name = priority
        key_flows[key_name] = KeyFlow(name, weight)
    ordered = tuple(sorted(classes.values(), key=lambda c: c.priority))
    return FlowPolicy(enabled=enabled, classes=ordered, default_class=default_class), key_flows


def _listener(raw: dict, section: str, default_port: int) -> tuple[str, int]:
    listen = _expect(raw.get(section, {}), dict, section)
    _no_unknown(listen, {"host", "port"}, section)
    host = _expect(listen.get("host", "127.0.0.1"), str, f"{section}.host")
    port = _expect(listen.get("port", default_port), int, f"{section}.port")
    if not 0 < port < 65536:
        raise ConfigError(f"{section}.port: must be between 1 and 65535, got {port}")
    return host, port


def parse_config(raw: Any) -> GatewayConfig:
    """Turn the YAML document into a GatewayConfig, or raise ConfigError."""
    _expect(raw, dict, "config")
    _no_unknown(
        raw,
        {
            "listen",
            "admin_listen",
            "workers",
            "auth",
            "models",
            "timeouts",
            "limits",
            "health",
            "breaker",
            "queue",
            "usage",
            "routing",
            "flow",
        },
        "",
    )

    host, port = _listener(raw, "listen", 8000)
    admin_host, admin_port = _listener(raw, "admin_listen", 8001)
    if (admin_host, admin_port) == (host, port):
        raise ConfigError(
            f"admin_listen: the admin API needs its own address, not listen's {host}:{port} (the public one)"
        )

    workers = raw.get("workers", "auto")
    if workers == "auto":
        workers = len(os.sched_getaffinity(0))
    elif isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
        raise ConfigError(f"workers: must be 'auto' or a number from 1 to 256, got {workers!r}")

    auth = _expect(raw.get("auth", {}), dict, "auth")
    _no_unknown(auth, {"require_api_key", "api_keys", "admin_keys"}, "auth")
    require = _expect(auth.get("require_api_key", True), bool, "auth.require_api_key")
    keys, key_policies, key_priorities = _keys(auth, "api_keys", with_policies=True)
    admin_keys, _none, _no_flows = _keys(auth, "admin_keys")
    shared = sorted(set(keys) & set(admin_keys))
    if shared:
        raise ConfigError(f"auth.admin_keys: the key named {admin_keys[shared[0]]!r} is also a client key")
    if require and not keys:
        raise ConfigError("auth.api_keys: require_api_key is true but no key is configured")

    models: dict[str, ModelConfig] = {}
    for i, entry in enumerate(_expect(raw.get("models", []), list, "models")):
        model = _model(entry, f"models[{i}]")
        if model.name in models:
            raise ConfigError(f"models[{i}].name: duplicate model name {model.name!r}")
        models[model.name] = model
    adapters: dict[str, AdapterConfig] = {}
    for i, model in enumerate(models.values()):
        for j, adapter in enumerate(model.adapters):
            if adapter.name in models or adapter.name in adapters:
                other = (
                    f"an adapter of {adapters[adapter.name].parent!r}"
                    if adapter.name in adapters
                    else "a model"
                )
                raise ConfigError(
                    f"models[{i}].adapters[{j}].name: {adapter.name!r} is also the name of {other}"
                )
            adapters[adapter.name] = adapter

    timeouts_raw = _expect(raw.get("timeouts", {}), dict, "timeouts")
    _no_unknown(timeouts_raw, {"connect", "first_byte", "idle"}, "timeouts")
    defaults = Timeouts()
    timeouts = Timeouts(
        connect=_positive(timeouts_raw.get("connect", defaults.connect), "timeouts.connect"),
        first_byte=_positive(timeouts_raw.get("first_byte", defaults.first_byte), "timeouts.first_byte"),
        idle=_positive(timeouts_raw.get("idle", defaults.idle), "timeouts.idle"),
    )

    limits = _expect(raw.get("limits", {}), dict, "limits")
    _no_unknown(limits, {"max_body_bytes", "max_answer_bytes"}, "limits")
    max_body = int(_positive(limits.get("max_body_bytes", 4 * 1024 * 1024), "limits.max_body_bytes"))
    max_answer = int(
        _positive(limits.get("max_answer_bytes", DEFAULT_MAX_ANSWER_BYTES), "limits.max_answer_bytes")
    )

    health = _expect(raw.get("health", {}), dict, "health")
    _no_unknown(health, {"interval", "unhealthy_after"}, "health")
    interval = _positive(health.get("interval", 5.0), "health.interval")
    unhealthy_after = _expect(health.get("unhealthy_after", 3), int, "health.unhealthy_after")
    if unhealthy_after < 1:
        raise ConfigError(f"health.unhealthy_after: must be at least 1, got {unhealthy_after}")

    breaker_raw = _expect(raw.get("breaker", {}), dict, "breaker")
    _no_unknown(breaker_raw, {"window", "min_samples", "failure_rate", "cooldown"}, "breaker")
    breaker_defaults = BreakerPolicy()
    window = _expect(breaker_raw.get("window", breaker_defaults.window), int, "breaker.window")
    min_samples = _expect(
        breaker_raw.get("min_samples", breaker_defaults.min_samples), int, "breaker.min_samples"
    )
    if not 1 <= min_samples <= window:
        raise ConfigError(
            f"breaker.min_samples: must be between 1 and breaker.window ({window}), got {min_samples}"
        )
    rate = _positive(breaker_raw.get("failure_rate", breaker_defaults.failure_rate), "breaker.failure_rate")
    if rate > 1:
        raise ConfigError(f"breaker.failure_rate: must be at most 1, got {rate}")
    breaker = BreakerPolicy(
        window=window,
        min_samples=min_samples,
        failure_rate=rate,
        cooldown=_positive(breaker_raw.get("cooldown", breaker_defaults.cooldown), "breaker.cooldown"),
    )

    queue_raw = _expect(raw.get("queue", {}), dict, "queue")
    _no_unknown(queue_raw, {"per_slot", "max_wait"}, "queue")
    queue_defaults = QueuePolicy()
    per_slot = _expect(queue_raw.get("per_slot", queue_defaults.per_slot), int, "queue.per_slot")
    if per_slot < 0:
        raise ConfigError(f"queue.per_slot: must be 0 or more, got {per_slot}")
    queue = QueuePolicy(
        per_slot=per_slot,
        max_wait=_positive(queue_raw.get("max_wait", queue_defaults.max_wait), "queue.max_wait"),
    )

    flow, key_flows = _flow(raw.get("flow", {}), key_priorities, queue.max_wait)

    usage = _expect(raw.get("usage", {}), dict, "usage")
    _no_unknown(usage, {"sqlite", "postgres_dsn"}, "usage")
    usage_path = usage.get("sqlite")
    if usage_path is not None and not _expect(usage_path, str, "usage.sqlite").startswith("/"):
        raise ConfigError(f"usage.sqlite: must be an absolute path, got {usage_path!r}")
    postgres_dsn = usage.get("postgres_dsn")
    if postgres_dsn is not None:
        _expect(postgres_dsn, str, "usage.postgres_dsn")
        if not postgres_dsn.startswith(("postgresql://", "postgres://")):
            # Never echo the DSN: it may hold a password.
            raise ConfigError("usage.postgres_dsn: must be a postgresql:// URL")
        if usage_path is not None:
            raise ConfigError("usage: give sqlite or postgres_dsn, not both")

    for key_name, policy in key_policies.items():
        unknown = sorted((policy.models or frozenset()) - set(models) - set(adapters))
        if unknown:
            raise ConfigError(
                f"auth.api_keys: the key {key_name!r} is allowed {unknown[0]!r}, a model that is not served"
            )

    return GatewayConfig(
        adapters=adapters,
        affinity=_affinity(raw.get("routing", {})),
        key_policies=key_policies,
        admin_keys=admin_keys,
        usage_path=usage_path,
        usage_postgres_dsn=postgres_dsn,
        breaker=breaker,
        queue=queue,
        flow=flow,
        key_flows=key_flows,
        workers=workers,
        host=host,
        port=port,
        admin_host=admin_host,
        admin_port=admin_port,
        require_api_key=require,
        api_keys=keys,
        models=models,
        timeouts=timeouts,
        max_body_bytes=max_body,
        max_answer_bytes=max_answer,
        health_interval=interval,
        unhealthy_after=unhealthy_after,
    )


def load_config(path: str | Path) -> GatewayConfig:
    return read_config(path)[0]


def read_config(path: str | Path) -> tuple[GatewayConfig, bytes]:
    """The config in a file, and the bytes it was parsed from."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(raw), data


# Settings a running gateway cannot change: they take effect at its next start.
RESTART_FIELDS = (
    "host",
    "port",
    "admin_host",
    "admin_port",
    "max_body_bytes",
    "workers",
    "usage_path",
    "usage_postgres_dsn",
    # The shared prefix index is sized when the workers start.
    "affinity",
)


def restart_key(config: GatewayConfig) -> str:
    """A digest of what only a restart changes: equal for two configs when a
    reload (SIGHUP) applies every difference between them. The running gateway
    writes its own (``cortex-gateway serve``); the role compares it with the
    new file's (``cortex-gateway restart-key``) to reload or restart."""
    values = [repr(getattr(config, name)) for name in RESTART_FIELDS]
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def admin_url(config: GatewayConfig) -> str:
    """Where the admin API answers, as a URL a client on the same host can use."""
    host = config.admin_host
    if host in ("", "0.0.0.0"):  # noqa: S104 - the listener's address, not a bind
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.admin_port}"
