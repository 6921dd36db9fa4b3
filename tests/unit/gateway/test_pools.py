"""On-demand models: the gateway in front of a pool (llama-server in router
mode), here a fake router that loads, unloads and refuses as llama-server's
does (tests/integration/test_pools.py runs the real one)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from cortex_gateway.config import ConfigError, parse_config

from .conftest import AUTH, ENGINE_KEY, FakeEngine, make_config
from .test_metrics import scrape, value
from .test_resilience import wait_ready


@dataclass
class FakeRouter:
    """llama-server's router, as far as the gateway sees it: a request for a
    model that is not loaded waits in the router until there is room (the
    least recently used idle model is unloaded, never one that requests wait
    for), the model loads, and the request is served; at most
    ``max_resident`` models are loaded at once."""

    models: tuple[str, ...] = ("alpha", "beta")
    max_resident: int = 1
    load_delay: float = 0.05
    answer_delay: float = 0.02
    fail_load: set[str] = field(default_factory=set)
    states: dict[str, str] = field(default_factory=dict)
    busy: dict[str, int] = field(default_factory=dict)
    wanted: dict[str, int] = field(default_factory=dict)
    last_used: dict[str, float] = field(default_factory=dict)
    load_calls: list[str] = field(default_factory=list)
    # (event, model) in order: load, unload, start, end.
    events: list[tuple[str, str]] = field(default_factory=list)
    most_resident: int = 0
    # The real router's race between a load and its proxying (llama-server's
    # server-models.cpp): the model is unloaded again before the request
    # reaches its process, and the router answers one of these without
    # running it. Each is answered once, in this order, to the next requests.
    swap_losses: list[tuple[int, str]] = field(default_factory=list)
    # Whether the model stays loaded after such an answer (it was not a swap).
    keep_state_on_loss: bool = False
    # Every request body the router was sent.
    bodies: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        for model in self.models:
            self.states.setdefault(model, "unloaded")
            self.busy[model] = 0
            self.wanted[model] = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/models", self.listing)
        app.router.add_post("/v1/chat/completions", self.complete)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def resident(self) -> list[str]:
        return [m for m, s in self.states.items() if s in ("loaded", "loading")]

    async def listing(self, request: web.Request) -> web.Response:
        assert request.headers.get("Authorization") == f"Bearer {ENGINE_KEY}"
        data = []
        for model, state in self.states.items():
            status: dict[str, object] = {"value": "unloaded" if state == "failed" else state}
            if state == "failed":
                status.update(failed=True, exit_code=1)
            data.append({"id": model, "status": status})
        return web.json_response({"data": data})

    async def _ready(self, model: str) -> bool:
        """Wait until the model is loaded (loading it when there is room)."""
        self.wanted[model] += 1
        try:
            while self.states[model] != "loaded":
                if self.states[model] == "failed" and model in self.fail_load and self.load_calls:
                    return False
                if self.states[model] in ("unloaded", "failed"):
                    if len(self.resident()) >= self.max_resident:
                        idle = [
                            m
                            for m in self.resident()
                            if self.states[m] == "loaded" and self.busy[m] == 0 and self.wanted[m] == 0
                        ]
                        if idle:
                            victim = min(idle, key=lambda m: self.last_used.get(m, 0.0))
                            self.states[victim] = "unloaded"
                            self.events.append(("unload", victim))
                    if len(self.resident()) < self.max_resident:
                        self.load_calls.append(model)
                        self.states[model] = "loading"
                        self.most_resident = max(self.most_resident, len(self.resident()))
                        self.events.append(("load", model))
                        await asyncio.sleep(self.load_delay)
                        self.states[model] = "failed" if model in self.fail_load else "loaded"
                        continue
                await asyncio.sleep(0.01)
            return True
        finally:
            self.wanted[model] -= 1

    async def complete(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        model = body["model"]
        self.bodies.append(body)
        if model not in self.states:  # as llama-server's router: a name it does not serve
            return web.json_response(
                {"error": {"code": 400, "message": f"model '{model}' not found"}}, status=400
            )
        if self.swap_losses:
            status, message = self.swap_losses.pop(0)
            self.events.append(("lost", model))
            if not self.keep_state_on_loss:
                self.states[model] = "unloaded"
            if status == 400:
                return web.json_response({"error": {"code": 400, "message": message}}, status=400)
            # The proxy thread's plain body, under the router's JSON content type.
            return web.Response(status=status, text=message, content_type="application/json")
        if not await self._ready(model):
            return web.json_response({"error": {"message": f"model name={model} failed to load"}}, status=500)
        self.busy[model] += 1
        self.events.append(("start", model))
        self.last_used[model] = asyncio.get_running_loop().time()
        await asyncio.sleep(self.answer_delay)
        self.busy[model] -= 1
        self.events.append(("end", model))
        return web.json_response(
            {
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": model}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            }
        )


def pool_config(url: str, models=("alpha", "beta"), max_resident: int = 1, load_timeout=10, **extra) -> dict:
    config = make_config({m: [url] for m in models}, **extra)
    for model in config["models"]:
        model["load_timeout"] = load_timeout
        model["backends"][0]["pool"] = {"name": "small", "max_resident": max_resident}
    return config


async def ask(client, model: str) -> tuple[int, dict]:
    answer = await client.post("/v1/chat/completions", json={"model": model, "messages": []}, headers=AUTH)
    return answer.status, await answer.json()


async def alternate(ask_model, models, waves: int, per_wave: int, seconds: float = 30) -> dict[str, int]:
    """Waves of requests that alternate between the models, all of a wave at
    once; every outcome counted: ok (answered by the model asked for), the
    status and body, or the exception (each request bounded by ``seconds``)."""
    outcomes: dict[str, int] = {}

    async def one(model: str) -> None:
        try:
            async with asyncio.timeout(seconds):
                status, body = await ask_model(model)
            outcome = "ok" if status == 200 and body.get("model") == model else f"{status}: {body}"
        except Exception as exc:  # noqa: BLE001 - every way a request can fail is recorded
            outcome = f"{type(exc).__name__}: {exc}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    for _wave in range(waves):
        await asyncio.gather(*(one(models[i % len(models)]) for i in range(per_wave)))
    return outcomes


async def listed_states(client) -> dict[str, object]:
    listing = await (await client.get("/v1/models", headers=AUTH)).json()
    return {card["id"]: card.get("status", {}).get("value") for card in listing["data"]}


async def test_the_first_request_loads_the_model_and_those_meanwhile_share_the_load(
    engine_server, gateway_client
):
    router = FakeRouter(load_delay=0.3)
    client = await gateway_client(pool_config(await engine_server(router)))
    await wait_ready(client, "alpha", 1)
    assert await listed_states(client) == {"alpha": "unloaded", "beta": "unloaded"}
    results = await asyncio.gather(*(ask(client, "alpha") for _request in range(6)))
    assert [status for status, _body in results] == [200] * 6, results
    assert router.load_calls == ["alpha"]
    assert (await listed_states(client))["alpha"] == "loaded"
    samples = await scrape(client)
    backend = router_name(client)
    assert (
        value(samples, "cortex_gateway_model_loads_total", model="alpha", backend=backend, result="loaded")
        == 1
    )
    assert value(samples, "cortex_gateway_model_load_seconds_count", model="alpha") == 1


def router_name(client) -> str:
    return client.gateway.router.backends("alpha")[0].name


async def test_alternating_models_in_a_pool_of_one_all_answer_and_evict_each_other(
    engine_server, gateway_client
):
    router = FakeRouter(answer_delay=0.05)
    client = await gateway_client(pool_config(await engine_server(router)))
    await wait_ready(client, "alpha", 1)
    # Two waves of interleaved requests, several at once.
    outcomes = await alternate(lambda model: ask(client, model), ("alpha", "beta"), waves=2, per_wave=12)
    assert outcomes == {"ok": 24}
    assert router.most_resident == 1
    assert len(router.load_calls) >= 2
    assert set(router.load_calls) == {"alpha", "beta"}
    # Never two models serving at once: each model's requests end before the other's begin.
    running: dict[str, int] = {"alpha": 0, "beta": 0}
    for event, model in router.events:
        if event == "start":
            other = "beta" if model == "alpha" else "alpha"
            assert running[other] == 0
            running[model] += 1
        elif event == "end":
            running[model] -= 1
    samples = await scrape(client)
    backend = router_name(client)
    evictions = sum(
        value(samples, "cortex_gateway_model_evictions_total", model=m, backend=backend)
        for m in ("alpha", "beta")
    )
    assert evictions >= 1


async def test_a_waiting_load_holds_new_requests_for_the_busy_model(engine_server, gateway_client):
    """With alpha busy and beta waiting for the only place, a new alpha request
    waits for beta's turn instead of keeping alpha busy for ever."""
    router = FakeRouter(answer_delay=0.4)
    client = await gateway_client(pool_config(await engine_server(router)))
    await wait_ready(client, "alpha", 1)
    assert (await ask(client, "alpha"))[0] == 200
    first = asyncio.create_task(ask(client, "alpha"))
    await asyncio.sleep(0.1)
    waiting = asyncio.create_task(ask(client, "beta"))
    await asyncio.sleep(0.1)
    later = asyncio.create_task(ask(client, "alpha"))
    statuses = [(await t)[0] for t in (first, waiting, later)]
    assert statuses == [200, 200, 200]
    starts = [model for event, model in router.events if event == "start"]
    assert starts == ["alpha", "alpha", "beta", "alpha"]


async def test_a_request_the_router_lost_to_a_swap_is_sent_again_and_answered(engine_server, gateway_client):
    """Defect 13: the router answered 500 (or 400) for a request it never ran,
    because the model was unloaded between its load and the proxying; the
    client got 502 upstream_unavailable."""
    router = FakeRouter(
        swap_losses=[
            (500, "proxy error: Could not establish connection"),
            (400, "model name=alpha is not running"),
            (500, "proxy error: Could not establish connection"),
        ]
    )
    client = await gateway_client(pool_config(await engine_server(router)))
    await wait_ready(client, "alpha", 1)
    results = [await ask(client, "alpha") for _request in range(3)]
    assert [(status, body.get("model")) for status, body in results] == [(200, "alpha")] * 3
    # Each lost request ran once, after it was sent again.
    assert [event for event, _model in router.events].count("lost") == 3
    assert [event for event, _model in router.events].count("start") == 3


async def test_an_adapter_of_a_pool_model_is_asked_of_the_router_by_its_parents_name(
    engine_server, gateway_client
):
    """Defect 11: the body kept `model: <adapter>`, a name the router does not serve."""
    router = FakeRouter()
    config = pool_config(await engine_server(router))
    config["models"][0]["adapters"] = [{"name": "alpha-pirate", "scale": 0.5}]
    client = await gateway_client(config)
    await wait_ready(client, "alpha", 1)
    status, body = await ask(client, "alpha-pirate")
    assert status == 200, body
    assert router.bodies[-1]["model"] == "alpha"
    assert router.bodies[-1]["lora"] == [{"id": 0, "scale": 0.5}]
    status, body = await ask(client, "alpha")
    assert status == 200, body
    assert router.bodies[-1]["lora"] == [{"id": 0, "scale": 0.0}]


async def test_a_routers_other_errors_are_the_requests_answer(engine_server, gateway_client):
    """A router's own JSON error is relayed as it is; a plain-text one (its
    proxy thread's "proxy error: ...", sent as application/json) becomes an
    OpenAI error naming the model, never a body no client can parse."""
    router = FakeRouter(
        swap_losses=[(500, "something else broke"), (400, "model name=alpha is busy")],
        keep_state_on_loss=True,
    )
    client = await gateway_client(pool_config(await engine_server(router)))
    await wait_ready(client, "alpha", 1)
    answer = await client.post("/v1/chat/completions", json={"model": "alpha", "messages": []}, headers=AUTH)
    assert answer.status == 502
    error = (await answer.json())["error"]
    assert error["code"] == "upstream_error"
    assert "alpha" in error["message"]
    assert "something else broke" in error["message"]
    answer = await client.post("/v1/chat/completions", json={"model": "alpha", "messages": []}, headers=AUTH)
    assert answer.status == 400
    assert (await answer.json()) == {"error": {"code": 400, "message": "model name=alpha is busy"}}
    assert [event for event, _model in router.events] == ["lost", "lost"]


async def test_a_request_whose_model_the_router_unloaded_under_it_is_sent_again(
    engine_server, gateway_client
):
    """Found in a fresh run (tests/integration/test_pools.py): the router
    proxied a request to a model's process it had just told to stop for
    another model's load, and answered 500 "proxy error: Failed to read
    connection" as application/json; the client got that text. The model
    then reads unloaded: the request was lost to the swap and goes again."""
    router = FakeRouter(swap_losses=[(500, "proxy error: Failed to read connection")])
    client = await gateway_client(pool_config(await engine_server(router)))
    await wait_ready(client, "alpha", 1)
    status, body = await ask(client, "alpha")
    assert (status, body.get("model")) == (200, "alpha"), body
    assert [event for event, _model in router.events].count("start") == 1


async def test_a_broken_answer_from_a_model_still_loaded_is_not_sent_again(engine_server, gateway_client):
    """The same words from a model the router still lists as loaded: its
    process broke off (it may have run the request); a 502 in OpenAI's shape."""
    router = FakeRouter(keep_state_on_loss=True)
    client = await gateway_client(pool_config(await engine_server(router)))
    await wait_ready(client, "alpha", 1)
    assert (await ask(client, "alpha"))[0] == 200
    router.swap_losses.append((500, "proxy error: Failed to read connection"))
    status, body = await ask(client, "alpha")
    assert status == 502, body
    assert body["error"]["code"] == "upstream_error"
    assert "Failed to read connection" in body["error"]["message"]
    assert [event for event, _model in router.events].count("start") == 1


async def test_a_load_that_does_not_finish_in_time_is_a_503_naming_the_model(engine_server, gateway_client):
    router = FakeRouter(load_delay=30)
    other = FakeEngine()
    config = pool_config(await engine_server(router), load_timeout=1)
    config["models"].append(make_config({"resident": [await engine_server(other)]})["models"][0])
    client = await gateway_client(config)
    await wait_ready(client, "alpha", 1)
    await wait_ready(client, "resident", 1)
    status, body = await ask(client, "alpha")
    assert status == 503
    assert body["error"]["code"] == "model_not_loaded"
    assert "alpha" in body["error"]["message"]
    assert "1 s" in body["error"]["message"]
    # Another model is not held up by it.
    assert (await ask(client, "resident"))[0] == 200
    assert (await listed_states(client))["alpha"] == "loading"


async def test_a_model_whose_process_fails_to_load_is_a_503_that_says_so(engine_server, gateway_client):
    router = FakeRouter(fail_load={"beta"})
    client = await gateway_client(pool_config(await engine_server(router)))
    await wait_ready(client, "beta", 1)
    status, body = await ask(client, "beta")
    assert status == 503
    assert "failed to load" in body["error"]["message"]
    samples = await scrape(client)
    failed = value(
        samples,
        "cortex_gateway_model_loads_total",
        model="beta",
        backend=router_name(client),
        result="failed",
    )
    assert failed == 1
    # The pool's other model still loads and answers.
    assert (await ask(client, "alpha"))[0] == 200


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["models"][0].update(engine="vllm"), "the engine must be llamacpp"),
        (
            lambda c: c["models"][0]["backends"][0]["pool"].update(max_resident=0),
            "max_resident: must be at least 1",
        ),
        (lambda c: c["models"][0]["backends"][0]["pool"].update(size=1), "pool.size: unknown option"),
        (lambda c: c["models"][0].update(load_timeout=0), "load_timeout: must be greater than 0"),
    ],
)
def test_bad_pool_settings_are_named(change, message):
    config = pool_config("http://127.0.0.1:1")
    change(config)
    with pytest.raises(ConfigError, match=message):
        parse_config(config)


def test_a_model_always_resident_has_no_load_timeout():
    config = parse_config(make_config({"chat": ["http://127.0.0.1:1"]}))
    assert config.models["chat"].load_timeout == 0
    pooled = parse_config(pool_config("http://127.0.0.1:1", load_timeout=45))
    assert pooled.models["alpha"].load_timeout == 45
    assert pooled.models["alpha"].backends[0].pool == "small"
