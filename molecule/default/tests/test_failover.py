"""A replica killed under load: requests keep succeeding on the other replica,
streams on the killed one end instead of hanging, its breaker opens, and
routing comes back to it once it is up again. Real llama-servers throughout.

A request the killed engine had already taken is answered by the gateway with
a 502 that says the model server did not answer: it is never run a second
time on the other replica (the engine may have run it). At most one such
request per client thread: everything sent after the kill succeeds."""

from __future__ import annotations

import threading
import time

import openai
from scenario import GATEWAY_URL, RequestLoop

MODEL = "smollm2-135m-instruct"
KILLED = f"cortex-{MODEL}-1"
KILLED_BACKEND = "127.0.0.1:18101"
MAX_REQUESTS = 2000
MAX_SECONDS = 120
# Clients looping plain requests: each has at most one in flight when the replica dies.
LOOP_THREADS = 2


def metric(host, name: str, backend: str) -> float:
    for line in host.check_output("curl -s http://127.0.0.1:8000/metrics").splitlines():
        if line.startswith(name + "{") and f'backend="{backend}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {name} for backend {backend}")  # missing is not 0


def requests_to(host, backend: str) -> float:
    total = 0.0
    for line in host.check_output("curl -s http://127.0.0.1:8000/metrics").splitlines():
        if line.startswith("cortex_gateway_requests_total{") and f'backend="{backend}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_killed_replica_costs_no_request_and_comes_back(host, client_key):
    client = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=60, max_retries=0)
    stream_ends: list[str] = []

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

    streams = [threading.Thread(target=stream) for _stream in range(2)]
    try:
        with RequestLoop(
            client, MODEL, threads=LOOP_THREADS, max_requests=MAX_REQUESTS, max_seconds=MAX_SECONDS
        ) as loop:
            for thread in streams:
                thread.start()
            time.sleep(2)
            host.run_expect([0], f"docker kill {KILLED}")
            time.sleep(10)
        for thread in streams:
            thread.join(timeout=90)
        assert not any(t.is_alive() for t in streams), "a stream hung"
        assert len(loop.outcomes) >= 10, f"the load loop made only {len(loop.outcomes)} requests"
        # The gateway's 502 for a request the engine had taken: no answer came,
        # or the answer broke off (never a second run on the other replica).
        under_way = [
            f
            for f in loop.failures
            if f.startswith("InternalServerError: Error code: 502")
            and ("did not answer" in f or "broke off its answer" in f)
        ]
        assert loop.failures == under_way, (
            f"{len(loop.failures)} of {len(loop.outcomes)} requests failed: {loop.failures[:3]}"
        )
        assert len(under_way) <= LOOP_THREADS, under_way
        assert len(stream_ends) == 2  # every stream finished one way or the other
        # Refused connections open the breaker at once (or the health check took it out first).
        assert metric(host, "cortex_gateway_breaker_state", KILLED_BACKEND) == 2 or (
            metric(host, "cortex_gateway_backend_up", KILLED_BACKEND) == 0
        )
    finally:
        # Whatever happened, the replica runs again for the tests after this one.
        host.run(f"docker start {KILLED}")
        for _attempt in range(120):
            if host.run(f"curl -sf -o /dev/null http://{KILLED_BACKEND}/health").rc == 0:
                break
            time.sleep(1)

    before = requests_to(host, KILLED_BACKEND)
    deadline = time.monotonic() + 60
    asked = 0
    while requests_to(host, KILLED_BACKEND) <= before and time.monotonic() < deadline:
        # New conversations each time: they go to the least loaded replica, in
        # turn (one conversation would stay with its replica, by prefix affinity).
        asked += 1
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Hi, this is conversation {asked}."}],
            max_tokens=2,
        )
    assert requests_to(host, KILLED_BACKEND) > before, "routing never came back to the restarted replica"
    # Every worker polls health on its own (every 5 s) and the gauge is the
    # minimum over workers: up once the last worker has seen it back.
    deadline = time.monotonic() + 30
    while metric(host, "cortex_gateway_backend_up", KILLED_BACKEND) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metric(host, "cortex_gateway_backend_up", KILLED_BACKEND) == 1
