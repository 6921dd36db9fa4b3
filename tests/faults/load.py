"""A bounded client load for the fault suite, with every outcome classified.

Requests go through nginx with plain aiohttp (not the openai client) so that
each way a request can end is told apart: a complete answer, an error status
(from the gateway, in the OpenAI shape, or from nginx), a stream that ends
with an SSE error event, a stream whose connection closes without one, a
stream or answer that hangs (nothing for ``hang_seconds``), or any exception.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

OK = "ok"
CUT_WITH_ERROR_EVENT = "stream cut: SSE error event"
CUT_CLOSED = "stream cut: connection closed"
HUNG = "hung"


@dataclass
class Tally:
    """Every outcome of a load, and how many the gateway itself answered."""

    outcomes: Counter = field(default_factory=Counter)
    # Requests sent once more because a kept-alive connection closed before
    # any answer came (as the openai client does; nginx closes idle
    # connections on a reload): each is counted once, by its final outcome.
    resent: int = 0
    # Answers that came from the gateway (JSON or a stream), not from nginx alone.
    gateway_answers: int = 0
    samples: dict[str, str] = field(default_factory=dict)

    def add(self, outcome: str, *, from_gateway: bool, sample: str = "") -> None:
        self.outcomes[outcome] += 1
        self.gateway_answers += from_gateway
        self.samples.setdefault(outcome, sample[:300])

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    @property
    def failed(self) -> int:
        return self.sent - self.outcomes[OK]

    @property
    def cut(self) -> int:
        return self.outcomes[CUT_WITH_ERROR_EVENT] + self.outcomes[CUT_CLOSED]


# Clients looping non-streamed requests, one request in flight each.
PLAIN_LOOPS = 2


async def _one(session: aiohttp.ClientSession, url: str, key: str, model: str, stream: bool, tally: Tally,
               hang_seconds: float, max_tokens: int) -> None:  # fmt: skip
    body = {
        "model": model,
        # A new conversation each time (the number sent so far makes it its
        # own): new conversations go to the least loaded replica, so the load
        # reaches every replica and the fault, whichever replica it breaks.
        "messages": [
            {"role": "user", "content": f"Tell me about the sea, question {tally.sent + tally.resent}."}
        ],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=hang_seconds)
    headers = {"Authorization": f"Bearer {key}"}
    # What a stream showed before it ended, however it ended.
    seen = {"error_event": False}
    try:
        try:
            response = await session.post(url, json=body, headers=headers, timeout=timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # no connection at all: not a kept-alive one that closed
            tally.resent += 1
            response = await session.post(url, json=body, headers=headers, timeout=timeout)
        async with response:
            kind = response.headers.get("Content-Type", "")
            if response.status != 200:
                text = await response.text()
                from_gateway = "application/json" in kind and '"error"' in text
                source = "gateway" if from_gateway else "nginx"
                tally.add(f"{source} {response.status}", from_gateway=from_gateway, sample=text)
                return
            if not stream:
                answer = await response.json()
                ok = bool(answer.get("choices"))
                tally.add(
                    OK if ok else "answer without choices", from_gateway=True, sample=json.dumps(answer)
                )
                return
            finished = done = False
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    seen["error_event"] = True
                for choice in event.get("choices") or []:
                    finished = finished or bool(choice.get("finish_reason"))
            if finished and done:
                tally.add(OK, from_gateway=True)
            elif seen["error_event"]:
                tally.add(CUT_WITH_ERROR_EVENT, from_gateway=True)
            else:
                tally.add(CUT_CLOSED, from_gateway=True)
    except TimeoutError:
        tally.add(HUNG, from_gateway=False)
    except aiohttp.ClientPayloadError as exc:
        # The connection closed mid-body: a cut stream (or answer) with no error event.
        tally.add(
            CUT_CLOSED if stream else f"answer cut: {type(exc).__name__}", from_gateway=True, sample=str(exc)
        )
    except Exception as exc:  # noqa: BLE001 - every way a request can fail is an outcome
        tally.add(f"{type(exc).__name__}", from_gateway=False, sample=str(exc))


async def run_load(
    url: str,
    key: str,
    model: str,
    stop: asyncio.Event,
    *,
    plain: int = PLAIN_LOOPS,
    streams: int = 2,
    max_requests: int = 400,
    max_seconds: float = 120,
    hang_seconds: float = 30,
    max_tokens: int = 24,
) -> Tally:
    """Loop requests on ``plain`` + ``streams`` concurrent clients until
    ``stop`` is set, ``max_requests`` were sent or ``max_seconds`` passed."""
    tally = Tally()
    deadline = time.monotonic() + max_seconds

    async def client(stream: bool) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set() and tally.sent < max_requests and time.monotonic() < deadline:
                await _one(session, url, key, model, stream, tally, hang_seconds, max_tokens)

    await asyncio.gather(
        *(client(False) for _plain in range(plain)), *(client(True) for _stream in range(streams))
    )
    return tally
