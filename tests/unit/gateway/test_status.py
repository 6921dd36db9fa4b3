"""The status page: admin-only data, right for every worker, and readable in a real browser."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import aiohttp
from cortex_gateway.auth import hash_key

from .conftest import AUTH, FakeEngine, gateway_process, make_config

ADMIN_KEY = "sk-admin-status-0123456789"
CAPPED_KEY = "sk-capped-status-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROOT = Path(__file__).resolve().parents[3]
# Set CORTEX_UPDATE_DOCS=1 to refresh the screenshot kept in the docs.
SCREENSHOT = ROOT / "docs" / "images" / "status-page.png"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed (scripts/bootstrap installs it)"
    return found


async def status_config(tmp_path: Path, engine_server) -> dict:
    healthy = await engine_server(FakeEngine())
    down = await engine_server(FakeEngine(health_status=503))
    failing = await engine_server(FakeEngine(status=500))
    config = make_config({"chat": [healthy, down], "embed": [failing]}, workers=2)
    config["usage"] = {"sqlite": str(tmp_path / "usage.db")}
    config["auth"]["admin_keys"] = [{"name": "ops", "sha256": hash_key(ADMIN_KEY)}]
    # A key over its limit, and in a class of its own: its refusals are on the page.
    config["auth"]["api_keys"].append(
        {
            "name": "capped",
            "sha256": hash_key(CAPPED_KEY),
            "priority": "batch",
            "limits": {"requests_per_minute": 1},
        }
    )
    return config


async def traffic(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for model, count in (("chat", 5), ("embed", 2)):
            for _request in range(count):
                async with session.post(
                    base + "/v1/completions", json={"model": model}, headers=AUTH
                ) as answer:
                    await answer.read()
        for _request in range(2):
            async with session.post(
                base + "/v1/completions",
                json={"model": "chat"},
                headers={"Authorization": f"Bearer {CAPPED_KEY}"},
            ) as answer:
                await answer.read()


async def status_json(base: str, headers: dict) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + "/admin/status.json", headers=headers) as answer,
    ):
        return answer.status, await answer.json()


async def test_status_json_is_for_admins_and_adds_up_over_workers(engine_server, tmp_path):
    config = await status_config(tmp_path, engine_server)
    async with gateway_process(config, tmp_path) as gateway:
        await traffic(gateway.base)
        assert (await status_json(gateway.admin_base, {}))[0] == 401
        assert (await status_json(gateway.admin_base, AUTH))[0] == 403
        for _attempt in range(30):  # the records are written within a second or so
            status, data = await status_json(gateway.admin_base, ADMIN)
            if data["models"][0]["requests_last_minute"] == 7 and len(data["recent_errors"]) == 3:
                break
            await asyncio.sleep(0.2)
        assert status == 200
        assert data["workers"] == 2
        chat, embed = data["models"]
        assert (chat["name"], chat["engine"], chat["ready"]) == ("chat", "llamacpp", 1)
        assert [r["ready"] for r in chat["replicas"]] == [True, False]
        assert {r["breaker"] for r in chat["replicas"]} == {"closed"}
        assert chat["requests_last_minute"] == 7  # the capped key's two included
        assert chat["errors_last_minute"] == 1
        assert chat["tokens_per_second"] == round(6 / 60, 2)  # FakeEngine: 1 completion token each
        assert chat["queued_by_class"] == {"interactive": 0, "standard": 0, "batch": 0}
        assert data["refusals"] == [
            {"key": "capped", "reason": "requests_per_minute_exceeded", "requests": 1}
        ]
        assert chat["routing"] == "prefix_affinity"
        # FakeEngine reports no cached tokens: no hit rate, not a made-up 0%.
        assert [(r["cache_hit_rate"], r["prompt_tokens"]) for r in chat["replicas"]] == [(None, 0), (None, 0)]
        assert embed["errors_last_minute"] == 2
        assert sorted((e["model"], e["key"], e["status"] >= 500) for e in data["recent_errors"]) == [
            ("chat", "capped", False),
            ("embed", "tests", True),
            ("embed", "tests", True),
        ]


async def test_the_page_renders_in_headless_chromium(engine_server, tmp_path):
    browser = chromium()
    config = await status_config(tmp_path, engine_server)
    async with gateway_process(config, tmp_path) as gateway:
        await traffic(gateway.base)
        await asyncio.sleep(1.5)  # records written
        url = f"{gateway.admin_base}/admin/status#key={ADMIN_KEY}"
        common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=4000"]  # fmt: skip

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*common, *args], capture_output=True, text=True, timeout=90, check=False)

        dom = (await asyncio.to_thread(run, "--dump-dom", url)).stdout
        assert 'data-model="chat"' in dom
        assert 'data-model="embed"' in dom
        assert ">ready</span>" in dom
        assert ">down</span>" in dom
        assert ">closed</span>" in dom
        assert "<b>2 / 3</b><span>Replicas ready</span>" in dom
        # Each replica's prompt cache hit rate (a dash until its engine reports cached tokens).
        assert "Prompt cache hits</th>" in dom
        assert "prompt tokens from the engine's cache" in dom
        assert dom.count("<td>embed</td>") >= 2  # its model row and its two errors
        assert "<td>capped</td><td>requests_per_minute_exceeded</td>" in dom
        # Without a key the page asks for one, and shows no data.
        bare = (await asyncio.to_thread(run, "--dump-dom", f"{gateway.admin_base}/admin/status")).stdout
        assert "an admin key is needed" in bare
        assert 'data-model="chat"' not in bare

        shot = tmp_path / "status.png"
        await asyncio.to_thread(
            run, f"--screenshot={shot}", "--window-size=1280,720", "--hide-scrollbars", url
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
        if os.environ.get("CORTEX_UPDATE_DOCS") == "1":
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)


async def test_the_admin_api_is_not_on_the_public_listener(engine_server, tmp_path):
    config = await status_config(tmp_path, engine_server)
    async with gateway_process(config, tmp_path) as gateway, aiohttp.ClientSession() as session:
        for path in ("/admin/status", "/admin/status.json", "/admin/backends", "/admin/usage"):
            # Public: no such path for a client, and an admin key is no client key there.
            async with session.get(gateway.base + path, headers=AUTH) as public:
                assert public.status == 404, path
                assert (await public.json())["error"]["type"] == "invalid_request_error"
            async with session.get(gateway.base + path, headers=ADMIN) as public:
                assert public.status == 401, path
            async with session.get(gateway.admin_base + path, headers=ADMIN) as admin:
                assert admin.status == 200, path
        drain = {"backend": next(iter(config["models"]))["backends"][0]["url"]}
        async with session.post(gateway.base + "/admin/backends/drain", json=drain, headers=AUTH) as public:
            assert public.status == 404
