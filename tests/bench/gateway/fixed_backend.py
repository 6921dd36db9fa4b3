"""A fast OpenAI-compatible backend with a fixed latency, for gateway benchmarks.

    python fixed_backend.py PORT [--delay-ms 0] [--chunks 16] [--chunk-ms 0]

Answers /v1/chat/completions (plain or streamed) and /health; every answer
is the same, so the benchmark measures what sits in front of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

ANSWER = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24},
}


def make_app(delay: float, chunks: int, chunk_delay: float) -> web.Application:
    body = json.dumps(ANSWER).encode()
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
    }
    event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    usage = b"data: " + json.dumps({**chunk, "choices": [], "usage": ANSWER["usage"]}).encode() + b"\n\n"

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model"}]})

    async def complete(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if delay:
            await asyncio.sleep(delay)
        if not payload.get("stream"):
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _chunk in range(chunks):
            await response.write(event)
            if chunk_delay:
                await asyncio.sleep(chunk_delay)
        await response.write(usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", complete)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--chunk-ms", type=float, default=0.0)
    args = parser.parse_args()
    app = make_app(args.delay_ms / 1000, args.chunks, args.chunk_ms / 1000)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=lambda *_: None)


if __name__ == "__main__":
    main()
