"""A replica killed under load: requests keep succeeding on the other replica,
streams on the killed one end instead of hanging, its breaker opens, and
routing comes back to it once it is up again. Real llama-servers throughout."""

from __future__ import annotations

import threading
import time

import openai
from conftest import GATEWAY_URL

MODEL = "smollm2-135m-instruct"
KILLED = f"cortex-{MODEL}-1"
KILLED_BACKEND = "127.0.0.1:18101"
MAX_REQUESTS = 2000
MAX_SECONDS = 120


def metric(host, name: str, backend: str) -> float:
    for line in host.check_output("curl -s http://127.0.0.1:8000/metrics").splitlines():
        if line.startswith(name + "{") and f'backend="{backend}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def requests_to(host, backend: str) -> float:
    total = 0.0
    for line in host.check_output("curl -s http://127.0.0.1:8000/metrics").splitlines():
        if line.startswith("cortex_gateway_requests_total{") and f'backend="{backend}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_killed_replica_costs_no_request_and_comes_back(host, client_key):
    client = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=60, max_retries=0)
    stop = threading.Event()
    outcomes: list[str] = []
    stream_ends: list[str] = []

    def load():
        deadline = time.monotonic() + MAX_SECONDS
        while not stop.is_set() and len(outcomes) < MAX_REQUESTS and time.monotonic() < deadline:
            try:
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
                )
                outcomes.append("ok")
            except openai.APIError as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")

    def stream():
        try:
            pieces = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Count to one hundred."}],
                max_tokens=200,
                stream=True,
            )
            for _piece in pieces:
                pass
            stream_ends.append("completed")
        except openai.APIError as exc:
            stream_ends.append(f"ended with {type(exc).__name__}")

    workers = [threading.Thread(target=load) for _worker in range(2)]
    streams = [threading.Thread(target=stream) for _stream in range(4)]
    for thread in workers + streams:
        thread.start()
    time.sleep(2)
    host.run_expect([0], f"docker kill {KILLED}")
    time.sleep(5)
    stop.set()
    for thread in workers + streams:
        thread.join(timeout=90)
    assert not any(t.is_alive() for t in workers + streams), "a request hung"
    failures = [o for o in outcomes if o != "ok"]
    assert len(outcomes) >= 10
    assert failures == [], f"{len(failures)} of {len(outcomes)} requests failed: {failures[:3]}"
    assert len(stream_ends) == 4  # every stream finished one way or the other
    # Refused connections open the breaker at once (or the health check took it out first).
    assert metric(host, "cortex_gateway_breaker_state", KILLED_BACKEND) == 2 or (
        metric(host, "cortex_gateway_backend_up", KILLED_BACKEND) == 0
    )

    host.run_expect([0], f"docker start {KILLED}")
    for _attempt in range(120):
        if host.run(f"curl -sf -o /dev/null http://{KILLED_BACKEND}/health").rc == 0:
            break
        time.sleep(1)
    before = requests_to(host, KILLED_BACKEND)
    deadline = time.monotonic() + 60
    while requests_to(host, KILLED_BACKEND) <= before and time.monotonic() < deadline:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
    assert requests_to(host, KILLED_BACKEND) > before, "routing never came back to the restarted replica"
    assert metric(host, "cortex_gateway_backend_up", KILLED_BACKEND) == 1
