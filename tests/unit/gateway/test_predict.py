"""predicted_ttft routing: the predictions' terms, what is learnt from answers,
sharing across workers, and the request path choosing by them."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from cortex_gateway.backends import Backend, Health
from cortex_gateway.breaker import CircuitBreaker
from cortex_gateway.config import parse_config
from cortex_gateway.policies import BreakerPolicy
from cortex_gateway.predict import Predictor
from cortex_gateway.slots import SlotTable

from .conftest import AUTH, FakeEngine, make_config


def replica(url: str, slots: int = 2, running: int = 0) -> Backend:
    backend = Backend(
        model="chat",
        engine="llamacpp",
        url=url,
        api_key=None,
        max_concurrency=slots,
        breaker=CircuitBreaker(BreakerPolicy()),
    )
    backend.health = Health.READY
    backend.own_in_flight = running
    return backend


def taught(predictor: Predictor, *backends: Backend, per_token: float = 0.005, service: float = 3.0) -> None:
    """Answers as a CPU llama.cpp gives them: 200 uncached tokens at per_token a token."""
    for backend in backends:
        for _round in range(30):
            predictor.observe_first_token(backend, 0.05 + 200 * per_token, 200, 0, 0)
            predictor.observe_first_token(backend, 0.05, 200, 195, 0)
            predictor.observe_service(backend, service)


def test_the_replica_holding_the_prefix_is_predicted_fastest():
    home, other = replica("http://a:1"), replica("http://b:1")
    predictor = Predictor()
    taught(predictor, home, other)
    ranked = predictor.rank([other, home], prompt_tokens=1500, home=home, home_tokens=1400, home_ahead=0)
    assert ranked[0].backend is home
    assert ranked[0].seconds == pytest.approx(0.05 + 100 * 0.005, rel=0.05)
    assert ranked[1].seconds == pytest.approx(0.05 + 1500 * 0.005, rel=0.05)


def test_a_home_with_a_long_queue_loses_to_computing_the_prompt_again():
    home, other = replica("http://a:1", running=2), replica("http://b:1")
    predictor = Predictor()
    taught(predictor, home, other, service=3.0)
    short = predictor.rank([home, other], prompt_tokens=1500, home=home, home_tokens=1400, home_ahead=1)
    # Two ahead for 2 slots of 3 s each: 3 s of wait against 7.5 s of prefill.
    assert short[0].backend is home
    long = predictor.rank([home, other], prompt_tokens=1500, home=home, home_tokens=1400, home_ahead=8)
    assert long[0].backend is other
    assert long[1].wait == pytest.approx(9 * 3.0 / 2, rel=0.05)


def test_without_a_prefix_the_replica_with_less_prefill_pending_is_faster():
    busy, idle = replica("http://a:1", running=1), replica("http://b:1", running=1)
    predictor = Predictor()
    taught(predictor, busy, idle)
    # As many requests on each, but one of them is a long prompt not yet computed.
    predictor.hold(busy, 1500)
    predictor.hold(idle, 20)
    ranked = predictor.rank([busy, idle], prompt_tokens=400, home=None, home_tokens=0, home_ahead=0)
    assert [p.backend for p in ranked] == [idle, busy]
    assert ranked[1].seconds - 0.05 == pytest.approx((1500 + 400) * 0.005, rel=0.05)
    # Its first token came: nothing pending, the two are alike again.
    predictor.drop(busy, 1500)
    predictor.drop(idle, 20)
    again = predictor.rank([busy, idle], prompt_tokens=400, home=None, home_tokens=0, home_ahead=0)
    assert again[0].seconds == pytest.approx(again[1].seconds)


def test_a_conversation_stays_home_while_prompts_are_pending_there():
    """Pending prompts order the replicas for a new conversation only: a
    conversation's home keeps it (its later turns need the cache there)."""
    home, other = replica("http://a:1", running=1), replica("http://b:1")
    predictor = Predictor()
    taught(predictor, home, other)
    predictor.hold(home, 3000)
    ranked = predictor.rank([other, home], prompt_tokens=1500, home=home, home_tokens=1400, home_ahead=0)
    assert ranked[0].backend is home
    new = predictor.rank([home, other], prompt_tokens=1500, home=None, home_tokens=0, home_ahead=0)
    assert new[0].backend is other


def test_the_seconds_per_token_are_learnt_with_the_prefill_pending_beside():
    backend = replica("http://a:1")
    predictor = Predictor()
    for _round in range(40):
        # 200 tokens of its own behind 600 of others: 800 tokens' time.
        predictor.observe_first_token(backend, 0.05 + 800 * 0.004, 200, 0, 600)
    assert predictor.estimate(backend).per_token == pytest.approx(0.004, rel=0.1)


def test_the_prefill_pending_is_counted_across_workers(tmp_path):
    path = str(tmp_path / "slots")
    first, second = SlotTable(path, 2, 0), SlotTable(path, 2, 1)
    backend = replica("http://a:1")
    one, two = Predictor(first), Predictor(second)
    one.hold(backend, 1000)
    two.hold(backend, 300)
    assert one.pending(backend) == two.pending(backend) == 1300
    one.drop(backend, 1000)
    assert two.pending(backend) == 300
    first.close()
    second.close()


def test_a_slower_replica_is_learnt_as_slower():
    fast, slow = replica("http://a:1"), replica("http://b:1")
    predictor = Predictor()
    taught(predictor, fast, per_token=0.002)
    taught(predictor, slow, per_token=0.008)
    assert predictor.estimate(fast).per_token == pytest.approx(0.002, rel=0.1)
    assert predictor.estimate(slow).per_token == pytest.approx(0.008, rel=0.1)
    ranked = predictor.rank([slow, fast], prompt_tokens=800, home=None, home_tokens=0, home_ahead=0)
    assert ranked[0].backend is fast


def test_the_bytes_per_token_are_learnt_per_model():
    predictor = Predictor()
    for _round in range(40):
        predictor.observe_prompt("chat", 6000, 1000)
    assert predictor.tokens("chat", 12000) == pytest.approx(2000, rel=0.05)
    assert predictor.tokens("other", 4000) == 1000  # the default ratio, 4 bytes a token


def test_every_worker_predicts_with_what_the_others_learnt(tmp_path):
    path = str(tmp_path / "slots")
    first, second = SlotTable(path, 2, 0), SlotTable(path, 2, 1)
    backend = replica("http://a:1")
    learner, reader = Predictor(first), Predictor(second)
    taught(learner, backend, per_token=0.01)
    assert reader.estimate(backend).per_token == pytest.approx(0.01, rel=0.1)
    # The second worker's own observations count as much as the first's.
    taught(reader, backend, per_token=0.02)
    assert learner.estimate(backend).per_token == pytest.approx(0.015, rel=0.15)
    first.close()
    second.close()


async def test_the_request_path_routes_a_conversation_back_and_reports_its_error(
    engine_server, gateway_client
):
    engines = [FakeEngine(chunks=3), FakeEngine(chunks=3)]
    urls = [await engine_server(e) for e in engines]
    raw = make_config({"chat": urls})
    raw["models"][0]["routing"] = {"policy": "predicted_ttft"}
    assert parse_config(raw).models["chat"].routing.policy == "predicted_ttft"
    client = await gateway_client(raw)
    for _round in range(100):
        if all(b.routable for b in client.gateway.backends):
            break
        await asyncio.sleep(0.05)
    conversation = [{"role": "system", "content": "report " * 800}, {"role": "user", "content": "first?"}]
    sent_to = []
    for turn in range(4):
        conversation = [*conversation, {"role": "user", "content": f"turn {turn}?"}]
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": conversation, "stream": True},
            headers=AUTH,
        )
        assert answer.status == 200
        await answer.read()
        sent_to.append([len(e.received) for e in engines])
    # Every turn after the first went where the first did.
    grew = [
        [after - before for before, after in zip(a, b, strict=True)] for a, b in itertools.pairwise(sent_to)
    ]
    home = 0 if sent_to[0][0] > 0 and sent_to[0][1] == 0 else 1
    assert all(step[home] >= 1 and step[1 - home] == 0 for step in grew), sent_to
    text = (await (await client.get("/metrics")).read()).decode()
    assert 'cortex_gateway_ttft_prediction_error_seconds_count{model="chat"} 4.0' in text, [
        line for line in text.splitlines() if "prediction" in line
    ]
    assert 'cortex_gateway_routing_decisions_total{decision="affinity",model="chat"} 3.0' in text
    # Each turn's prompt was pending on its replica until its first token:
    # nothing is left pending once every answer came (streamed or whole).
    whole = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": conversation}, headers=AUTH
    )
    assert whole.status == 200
    await whole.read()
    assert [client.gateway.predictor.pending(b) for b in client.gateway.backends] == [0, 0]
    # FakeEngine reports no cached tokens: nothing to compare, no series made up.
    assert "cortex_gateway_cache_expectations_total{" not in text


async def test_the_engines_cached_tokens_are_compared_with_what_the_index_expected(
    engine_server, gateway_client
):
    """A new conversation: nothing expected cached; an engine that says it
    reused nothing agrees, one that says it reused 500 tokens does not."""
    counts = {}
    for reported in (0, 500):
        url = await engine_server(FakeEngine(cached_tokens=reported))
        raw = make_config({"chat": [url]})
        raw["models"][0]["routing"] = {"policy": "predicted_ttft"}
        client = await gateway_client(raw)
        for _attempt in range(100):
            if all(b.routable for b in client.gateway.backends):
                break
            await asyncio.sleep(0.05)
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "new " * 600}], "stream": True},
            headers=AUTH,
        )
        assert answer.status == 200
        await answer.read()
        text = (await (await client.get("/metrics")).read()).decode()
        counts[reported] = [
            line for line in text.splitlines() if line.startswith("cortex_gateway_cache_expectations_total{")
        ]
    assert counts[0] == ['cortex_gateway_cache_expectations_total{model="chat",result="agree"} 1.0']
    assert counts[500] == ['cortex_gateway_cache_expectations_total{model="chat",result="disagree"} 1.0']
