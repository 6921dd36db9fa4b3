"""The status page: what an operator wants at a glance, for every worker at once.

Live state (health, breakers, requests in flight, queues) is read from the
metrics, which add up over the workers; the last minute's traffic, tokens/s
and recent errors come from the usage records, which every worker (and every
gateway sharing PostgreSQL) writes to.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from importlib import resources
from typing import Any

from prometheus_client import CollectorRegistry

from .config import GatewayConfig

BREAKER_NAMES = {0: "closed", 1: "half-open", 2: "open"}
WINDOW_SECONDS = 60
RECENT_ERRORS = 20
# Gauge values by metric name and (model, backend) or (model,).
Gauges = dict[str, dict[tuple[str, ...], float]]


def page() -> bytes:
    """The page itself: plain HTML and JS, no data in it (that needs an admin key)."""
    return resources.files(__package__).joinpath("status.html").read_bytes()


def _gauges(registry: CollectorRegistry) -> Gauges:
    """Gauge values by metric name and (model, backend) or (model,); the
    prompt cache counter too, by name and result (cache_hit, cache_miss)."""
    values: dict[str, dict[tuple[str, ...], float]] = defaultdict(dict)
    for family in registry.collect():
        for sample in family.samples:
            key = (sample.labels.get("model", ""), sample.labels.get("backend", ""))
            if sample.name == "cortex_gateway_class_queue_depth":
                values[sample.name][(sample.labels["model"], sample.labels["class"])] = sample.value
            elif sample.name == "cortex_gateway_refusals_total":
                values["refusals"][(sample.labels["key"], sample.labels["reason"])] = sample.value
            elif sample.name.startswith("cortex_gateway_") and family.type == "gauge":
                values[sample.name][key] = sample.value
            elif sample.name == "cortex_gateway_prompt_cache_tokens_total":
                values["cache_" + sample.labels["result"]][key] = sample.value
    return values


def backend_rows(backends: Iterable[Any], registry: CollectorRegistry) -> list[dict[str, Any]]:
    """Each backend as the whole gateway sees it: ready and draining only when
    every worker says so, requests in flight summed, the most open breaker."""
    return _backend_rows(backends, _gauges(registry))


def _backend_rows(backends: Iterable[Any], gauges: Gauges) -> list[dict[str, Any]]:
    rows = []
    for backend in backends:
        key = (backend.model, backend.name)
        ready = gauges["cortex_gateway_backend_up"].get(key, 0) == 1
        draining = gauges["cortex_gateway_backend_draining"].get(key, 0) == 1
        rows.append(
            {
                "model": backend.model,
                "engine": backend.engine,
                "backend": backend.name,
                "url": backend.url,
                "ready": ready,
                "draining": draining,
                "state": "draining" if draining else "ready" if ready else backend.health.value,
                "breaker": BREAKER_NAMES.get(int(gauges["cortex_gateway_breaker_state"].get(key, 0)), "?"),
                "in_flight": int(gauges["cortex_gateway_in_flight"].get(key, 0)),
                "slots": backend.max_concurrency,
                **_cache_figures(gauges["cache_hit"].get(key, 0), gauges["cache_miss"].get(key, 0)),
            }
        )
        if getattr(backend, "pool", None) is not None:
            # Loaded on demand there: this worker's last look at the router.
            rows[-1].update(pool=backend.pool, loaded=backend.load_state)
    return rows


def _cache_figures(hit: float, miss: float) -> dict[str, Any]:
    """Prompt tokens the backend's engine took from its cache, of all it was sent."""
    total = int(hit + miss)
    return {
        "cached_prompt_tokens": int(hit),
        "prompt_tokens": total,
        "cache_hit_rate": round(hit / total, 4) if total else None,
    }


def snapshot(
    config: GatewayConfig,
    backends: Iterable[Any],
    registry: CollectorRegistry,
    last_minute: list[dict] | None,
    errors: list[dict] | None,
    started: float,
    now: float | None = None,
) -> dict[str, Any]:
    """The JSON the page shows. last_minute/errors are None when no usage records are kept."""
    now = time.time() if now is None else now
    gauges = _gauges(registry)
    traffic = {row["model"]: row for row in last_minute or []}
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _backend_rows(backends, gauges):
        by_model[row["model"]].append(row)
    models = []
    for name, model in config.models.items():
        replicas = by_model.get(name, [])
        row = traffic.get(name, {})
        kept = last_minute is not None  # else: no usage records, so no traffic figures
        completion = row.get("completion_tokens") or 0
        models.append(
            {
                "name": name,
                "engine": model.engine,
                "routing": model.routing.policy,
                "replicas": replicas,
                "ready": sum(1 for r in replicas if r["ready"]),
                "queued": int(gauges["cortex_gateway_queue_depth"].get((name, ""), 0)),
                "queued_by_class": {
                    flow_class: int(count)
                    for (model_name, flow_class), count in gauges["cortex_gateway_class_queue_depth"].items()
                    if model_name == name
                },
                "requests_last_minute": row.get("requests", 0) if kept else None,
                "errors_last_minute": row.get("errors", 0) if kept else None,
                "tokens_per_second": round(completion / WINDOW_SECONDS, 2) if kept else None,
            }
        )
    return {
        "time": now,
        "uptime_seconds": round(now - started, 1),
        "workers": config.workers,
        "usage_records": last_minute is not None,
        "models": models,
        "refusals": [
            {"key": key, "reason": reason, "requests": int(count)}
            for (key, reason), count in sorted(gauges["refusals"].items())
            if count
        ],
        "recent_errors": errors,
    }
