"""Flow control on the real engines: a request of the interactive class
overtakes a queue of standard ones, on llama.cpp and on vLLM, through nginx
and every gateway worker; vLLM gets the key's class priority on each request."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from scenario import GATEWAY_URL, credential, gateway_series

# (model, its slots across replicas: llama.cpp 2 x parallel 2, vLLM 2 x max_num_seqs 8)
MODELS = [("smollm2-135m-instruct", 4), ("smollm2-135m-vllm", 16)]
# Standard requests queued beyond the slots: under first come, first served
# all of them would start before the interactive one.
QUEUED = 10


def first_token(client: openai.OpenAI, model: str, tag: str, max_tokens: int) -> tuple[float | None, str]:
    """When the stream's first chunk came (None: it failed), and how it ended."""
    first = None
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"[{tag}] Count from one to twenty."}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            if first is None and chunk.choices:
                first = time.monotonic()
    except openai.APIStatusError as exc:
        return None, f"status {exc.status_code}"
    except Exception as exc:  # noqa: BLE001 - every way a request can fail is recorded, by kind
        return None, type(exc).__name__
    return first, "ok"


@pytest.mark.parametrize(("model", "slots"), MODELS)
def test_an_interactive_request_overtakes_a_queue_of_standard_ones(host, client_key, model, slots):
    standard = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=300, max_retries=0)
    interactive = openai.OpenAI(
        base_url=GATEWAY_URL, api_key=credential("gateway-api-key", "interactive"), timeout=300, max_retries=0
    )
    count = slots + QUEUED
    results: dict[int, tuple[float | None, str]] = {}
    lock = threading.Lock()

    def send(number: int) -> None:
        outcome = first_token(standard, model, f"standard-{number}", 48)
        with lock:
            results[number] = outcome

    with ThreadPoolExecutor(max_workers=count + 1) as pool:
        for number in range(count):
            pool.submit(send, number)
            time.sleep(0.02)
        # Bounded: the queue forms within seconds on these engines.
        waiting = 0.0
        for _look in range(300):
            waiting = sum(
                gateway_series(
                    host, "cortex_gateway_class_queue_depth", model=model, **{"class": "standard"}
                ).values()
            )
            if waiting >= QUEUED - 2:
                break
            time.sleep(0.1)
        assert waiting >= QUEUED - 2, f"only {waiting} standard requests ever waited for {model}"
        sent = time.monotonic()
        mine = pool.submit(first_token, interactive, model, "interactive", 8)
        overtaker, how = mine.result(timeout=300)
    assert how == "ok", f"the interactive request failed: {how}"
    assert {outcome for _first, outcome in results.values()} == {"ok"}, results
    # Standard requests that began to answer between the interactive one's
    # arrival and its first token: at most those that had their slot already
    # (still in prefill), never the queue behind them.
    started_before_it = [
        n for n, (first, _how) in results.items() if first is not None and sent < first < overtaker
    ]
    assert len(started_before_it) <= slots, (
        f"{len(started_before_it)} standard requests of {model} started after the interactive one arrived"
        f" and before it ({waiting:.0f} were waiting): it did not overtake the queue"
    )
    assert len(started_before_it) < waiting


def test_vllm_runs_with_priority_scheduling(host):
    for replica in (0, 1):
        args = host.check_output(f"docker inspect -f '{{{{json .Args}}}}' cortex-smollm2-135m-vllm-{replica}")
        assert '"--scheduling-policy","priority"' in args
