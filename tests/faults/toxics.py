"""A fault proxy in front of a real engine: what a sick engine does that a
healthy llama-server cannot be made to do (answer 500s, trickle its answer).
Everything else is passed through byte for byte."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


@dataclass
class FaultProxy:
    upstream: str
    # "pass", "error500" (every request, health checks too), or "trickle"
    # (answers relayed one byte every ``trickle_seconds``; health checks pass).
    mode: str = "pass"
    trickle_seconds: float = 2.0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.cleanup_ctx.append(self._session)
        return app

    async def _session(self, _app: web.Application):
        # A new connection per request: reusing one that llama-server had
        # closed while idle failed a request with this proxy's own 500 (not
        # the fault it injects), seen once in the trickle fault.
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), connector=aiohttp.TCPConnector(force_close=True)
        )
        yield
        await self.session.close()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "error500":
            return web.json_response({"error": {"message": "injected fault", "code": 500}}, status=500)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
        async with self.session.request(request.method, self.upstream + request.path_qs, data=body,
                                        headers=headers) as upstream:  # fmt: skip
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
            )
            await response.prepare(request)
            trickle = self.mode == "trickle" and request.path != "/health"
            async for chunk in upstream.content.iter_any():
                if not trickle:
                    await response.write(chunk)
                    continue
                for byte in chunk:
                    await response.write(bytes([byte]))
                    await asyncio.sleep(self.trickle_seconds)
            await response.write_eof()
            return response
