"""Flow control on the real engines: a request of the interactive class
overtakes a queue of standard ones, on llama.cpp and on vLLM, through nginx
and every gateway worker; vLLM gets the key's class priority on each request."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from scenario import GATEWAY_URL, credential, gateway_series

# (model, its slots across replicas: llama.cpp 2 x parallel 2, vLLM 2 x
# max_num_seqs 8, tokens each standard request generates: enough to hold its
# slot while the test looks)
MODELS = [("smollm2-135m-instruct", 4, 64), ("smollm2-135m-vllm", 16, 96)]
# Standard requests queued beyond the slots: under first come, first served
# all of them would start before the interactive one.
QUEUED = 10


def first_token(client: openai.OpenAI, model: str, tag: str, max_tokens: int, started: dict) -> str:
    """Stream a chat; note when its first chunk came under ``tag``; how it ended."""
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"[{tag}] Count from one to a hundred."}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            # Both engines take it: every request runs to its max_tokens, so
            # the slots' requests end one after the other as planned (an early
            # end of text freed every slot at once and emptied the queue).
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if tag not in started and chunk.choices:
                started[tag] = time.monotonic()
    except openai.APIStatusError as exc:
        return f"status {exc.status_code}"
    except Exception as exc:  # noqa: BLE001 - every way a request can fail is recorded, by kind
        return type(exc).__name__
    return "ok"


@pytest.mark.parametrize(("model", "slots", "max_tokens"), MODELS)
def test_an_interactive_request_overtakes_a_queue_of_standard_ones(
    host, client_key, model: str, slots: int, max_tokens: int
):
    standard = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=300, max_retries=0)
    interactive = openai.OpenAI(
        base_url=GATEWAY_URL, api_key=credential("gateway-api-key", "interactive"), timeout=300, max_retries=0
    )
    started: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=slots + QUEUED + 1) as pool:
        outcomes = []
        for number in range(slots + QUEUED):
            # The slots' requests end one after the other (a slot at a time
            # frees); the queued ones are short.
            tokens = max_tokens + 12 * number if number < slots else 16
            outcomes.append(pool.submit(first_token, standard, model, f"standard-{number}", tokens, started))
            time.sleep(0.02)
        # The queue has formed, and every slot's request is answering (so a
        # request without a first token is one waiting in the queue) or the
        # queue has stood for 10 s (a slot holder still in prefill then
        # counts as queued, and it answers before the interactive request:
        # the check below only gets harder). Bounded: seconds on these engines.
        waiting = most = 0.0
        formed_at = None
        for _look in range(300):
            labels = {"model": model, "class": "standard"}
            waiting = sum(gateway_series(host, "cortex_gateway_class_queue_depth", **labels).values())
            most = max(most, waiting)
            if waiting >= QUEUED - 2:
                formed_at = formed_at or time.monotonic()
                if len(started) >= slots or time.monotonic() - formed_at > 10:
                    break
            time.sleep(0.1)
        ended = sorted(outcome.result() for outcome in outcomes if outcome.done())
        assert waiting >= QUEUED - 2, (
            f"{waiting:.0f} standard requests wait for {model} (at most {most:.0f} seen);"
            f" {len(started)} answering; ended: {ended}"
        )
        sent = time.monotonic()
        queued = {tag for tag in (f"standard-{n}" for n in range(slots + QUEUED)) if tag not in started}
        mine = pool.submit(first_token, interactive, model, "interactive", 8, started)
        how = mine.result(timeout=300)
        ends = [outcome.result(timeout=300) for outcome in outcomes]
    assert how == "ok", f"the interactive request failed: {how}"
    assert set(ends) == {"ok"}, ends
    # Standard requests that were still waiting when the interactive one
    # came and began to answer before it. First come, first served starts
    # all of them first. With flow control the interactive one takes the
    # next slot freed; on CPU vLLM a few queued ones still answer first (one
    # took a slot freed in another worker while more than one was free, or
    # its replica answered faster): seen 4 of 10, the head of the queue
    # among those passed. At least 3 passed tells the two apart.
    before_it = sorted(tag for tag in queued if started[tag] < started["interactive"])
    assert len(queued) >= QUEUED - 2, f"only {len(queued)} of {model}'s requests had not begun to answer"
    assert len(queued) - len(before_it) >= 3, (
        f"{len(before_it)} of the {len(queued)} standard requests of {model} waiting when the interactive one"
        f" came began to answer before it: {before_it}"
    )
    assert started["interactive"] > sent


def test_vllm_runs_with_priority_scheduling(host):
    for replica in (0, 1):
        args = host.check_output(f"docker inspect -f '{{{{json .Args}}}}' cortex-smollm2-135m-vllm-{replica}")
        assert '"--scheduling-policy","priority"' in args
