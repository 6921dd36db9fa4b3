"""The llama.cpp models on one host, converged: services, sockets, engine
hardening, and real chat completions and embeddings through nginx and the
gateway with the openai client (the vLLM models beside them: test_vllm.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import openai
import pytest
import requests
from loads import RequestLoop
from scenario import (
    GATEWAY_URL,
    admin_get,
    admin_key,
    assert_no_failures,
    assert_real_sentence_embeddings,
    assert_turns_return_to_their_replica,
    journal,
    streamed_chat,
)

MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
ENGINE_PORT = 18100


@pytest.mark.parametrize("unit", ["docker", "cortex-gateway", "cortex-gateway.socket", "nginx"])
def test_unit_is_active_and_enabled(host, unit):
    service = host.service(unit)
    assert service.is_running, journal(host, unit)
    assert service.is_enabled


def test_nginx_config_is_clean(host):
    result = host.run("nginx -t")
    assert result.rc == 0, result.stderr


def test_nginx_site_does_not_buffer(host):
    site = host.file("/etc/nginx/sites-enabled/cortex-gateway.conf")
    assert site.is_symlink
    assert "proxy_buffering off;" in site.content_string
    # The embedding model's own first_byte (900 s) and a 15 s margin: the gateway times out first.
    assert "        proxy_read_timeout 915s;" in site.content_string.splitlines()
    assert not host.file("/etc/nginx/sites-enabled/default").exists


def test_gateway_unit_runs_the_rendered_config(host):
    unit = host.file("/etc/systemd/system/cortex-gateway.service").content_string
    assert (
        "ExecStart=/opt/cortex-gateway/venv/bin/cortex-gateway serve --config /etc/cortex-gateway/config.yml"
        in unit.splitlines()
    )
    assert "User=cortex-gateway" in unit.splitlines()


def test_gateway_config_is_private_and_stores_only_key_digests(host, client_key):
    config = host.file("/etc/cortex-gateway/config.yml")
    assert config.mode == 0o640
    assert config.group == "cortex-gateway"
    assert client_key not in config.content_string


def listeners(host, port: int) -> set[str]:
    out = host.run(f"ss -Hltn 'sport = :{port}'").stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def test_engine_and_gateway_listen_on_loopback_only(host):
    assert listeners(host, ENGINE_PORT) == {"127.0.0.1"}
    assert listeners(host, ENGINE_PORT + 1) == {"127.0.0.1"}
    assert listeners(host, 8000) == {"127.0.0.1"}


def test_nginx_listens_for_clients(host):
    assert listeners(host, 80) & {"0.0.0.0", "*", "[::]"}  # noqa: S104 - nginx is the public side


@pytest.mark.parametrize(
    "container", [f"cortex-{MODEL}-0", f"cortex-{MODEL}-1", f"cortex-{EMBEDDING_MODEL}-0"]
)
def test_engine_container_is_hardened(host, container):
    inspect = json.loads(host.check_output(f"docker inspect {container}"))[0]
    assert inspect["State"]["Health"]["Status"] == "healthy"
    assert inspect["Config"]["User"] == "10001:10001"
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    assert inspect["HostConfig"]["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in inspect["HostConfig"]["SecurityOpt"]
    mounts = {m["Destination"]: m for m in inspect["Mounts"]}
    assert mounts["/models"]["RW"] is False
    assert mounts["/run/secrets/engine-api-key"]["RW"] is False
    assert "--api-key-file" in inspect["Config"]["Cmd"]


def test_engine_refuses_requests_without_its_key(host):
    status = host.check_output(
        "curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' "
        '-d \'{"messages":[{"role":"user","content":"hi"}]}\' '
        f"http://127.0.0.1:{ENGINE_PORT}/v1/chat/completions"
    )
    assert status == "401"


@pytest.fixture
def client(client_key):
    return openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=120, max_retries=0)


def test_models_lists_every_model(client):
    listed = sorted(m.id for m in client.models.list().data)
    vllm = ["smollm2-135m-vllm", "all-minilm-l6-v2-vllm"]
    # Each SmolLM2's LoRA adapter is a model name of its own (test_adapters.py).
    adapters = ["smollm2-135m-pirate", "smollm2-135m-vllm-pirate"]
    # The pool's models are listed whether loaded or not (test_pools.py).
    pool = ["smollm2-on-demand", "smollm2-on-demand-brief"]
    assert listed == sorted([MODEL, EMBEDDING_MODEL, *vllm, *adapters, *pool])


def test_each_replica_is_its_own_container_and_port(host):
    names = host.check_output(
        f"docker ps --filter label=io.cortex.model={MODEL} --format '{{{{.Names}}}}'"
    ).split()
    assert sorted(names) == [f"cortex-{MODEL}-0", f"cortex-{MODEL}-1"]
    for replica in (0, 1):
        ports = host.check_output(f"docker port cortex-{MODEL}-{replica} 8080/tcp")
        assert ports.strip() == f"127.0.0.1:{ENGINE_PORT + replica}"


def test_embeddings_are_real(client):
    assert_real_sentence_embeddings(client, EMBEDDING_MODEL)


def test_chat_completion_through_nginx(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
    )
    text = reply.choices[0].message.content or ""
    assert text.strip()
    assert reply.usage.completion_tokens > 0


def test_streamed_chat_completion_through_nginx(client):
    _chunks, pieces = streamed_chat(client, MODEL, 32)
    assert "".join(pieces).strip()


def test_completion_through_nginx(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8)
    assert reply.choices[0].text.strip()


def test_wrong_key_is_refused(client_key):
    bad = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as excinfo:
        bad.models.list()
    assert excinfo.value.status_code == 401


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert excinfo.value.body["code"] == "model_not_found"


def test_reload_keeps_the_gateway_process(host):
    before = host.check_output("systemctl show -p MainPID --value cortex-gateway")
    host.run_expect([0], "systemctl reload cortex-gateway")
    after = host.check_output("systemctl show -p MainPID --value cortex-gateway")
    assert before == after
    # The supervisor checks the file; every worker then reloads what it accepted.
    wanted = ["config from /etc/cortex-gateway/config.yml accepted", "config reloaded from"]
    for _attempt in range(20):  # the journal can trail the reload by a moment
        log = journal(host, "cortex-gateway")
        if all(line in log for line in wanted):
            break
        time.sleep(0.5)
    assert [line for line in wanted if line not in log] == []


def test_a_systemd_restart_under_load_fails_no_request(host, client):
    """`systemctl restart cortex-gateway` while requests and streams run: the
    streams in flight finish (the stop drains them), and the socket unit keeps
    the listener open, so what nginx sends meanwhile waits for the new process."""
    before = host.check_output("systemctl show -p MainPID --value cortex-gateway")
    with (
        RequestLoop(client, MODEL, threads=2, max_seconds=120) as loop,
        RequestLoop(client, MODEL, threads=2, max_seconds=120, stream=True) as streams,
    ):
        time.sleep(3)
        host.run_expect([0], "systemctl restart cortex-gateway")
        time.sleep(5)
    assert host.check_output("systemctl show -p MainPID --value cortex-gateway") != before
    assert_no_failures(loop, streams, minimum=4)


def test_usage_is_recorded_and_reported_to_admins_only(host, client, client_key):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    url = "http://127.0.0.1:8001/admin/usage?group_by=model"
    assert admin_get(host, url, client_key)[0] == 403
    for _attempt in range(20):  # records are written in batches, about every second
        status, body = admin_get(host, url, admin_key())
        assert status == 200, body
        rows = json.loads(body)["data"]
        if any(r["model"] == MODEL for r in rows):
            break
        time.sleep(0.5)
    chat = next(r for r in rows if r["model"] == MODEL)
    assert chat["requests"] >= 1
    assert chat["completion_tokens"] >= 1
    assert host.file("/var/lib/cortex-gateway/usage.db").user == "cortex-gateway"


def test_metrics_are_served_to_the_host_but_not_through_nginx(host):
    local = host.check_output("curl -s http://127.0.0.1:8000/metrics")
    assert "cortex_gateway_requests_total" in local
    assert requests.get("http://127.0.0.1:18088/metrics", timeout=10).status_code == 404


def test_nginx_serves_https_with_the_hosts_certificate(host):
    assert host.file("/etc/cortex-gateway/tls/key.pem").mode == 0o600
    status = host.check_output("curl -sk -o /dev/null -w '%{http_code}' https://127.0.0.1/healthz")
    assert status == "200"
    subject = host.check_output("openssl x509 -noout -subject -in /etc/cortex-gateway/tls/cert.pem")
    assert "cortex-molecule" in subject
    assert listeners(host, 443) & {"0.0.0.0", "*", "[::]"}  # noqa: S104 - nginx is the public side


def test_gateway_unit_exposure_is_low(host):
    verdict = host.check_output("systemd-analyze security cortex-gateway --no-pager").splitlines()[-1]
    # "→ Overall exposure level for cortex-gateway.service: 1.2 OK :-)"
    exposure = float(verdict.split(":")[1].split()[0])
    assert exposure <= 1.2, verdict  # what the README claims


def test_a_model_is_retrieved_with_its_engine(client):
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL
    assert model.model_extra["engine"] == "llamacpp"
    assert model.owned_by


def test_streamed_completion_through_nginx(client):
    stream = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, stream=True
    )
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces).strip()


def test_the_gateway_runs_one_worker_per_core(host):
    supervisor = host.check_output("systemctl show -p MainPID --value cortex-gateway")
    workers = host.check_output(f"cat /proc/{supervisor}/task/{supervisor}/children").split()
    assert len(workers) == int(host.check_output("nproc"))


def test_health_check_timer_writes_metrics_for_every_engine_and_the_gateway(host):
    assert host.service("cortex-healthcheck.timer").is_running
    assert host.service("cortex-healthcheck.timer").is_enabled
    host.run_expect([0], "systemctl start cortex-healthcheck.service")
    metrics = host.file("/var/lib/prometheus/node-exporter/cortex_health.prom").content_string
    engines = json.loads(host.check_output("cat /etc/cortex-healthcheck/config.json"))["engines"]
    # Two chat replicas and the embedding model on each engine, and the pool's
    # two models in one container, checked once under the pool's name.
    assert sorted(e["engine"] for e in engines) == ["llamacpp"] * 5 + ["vllm"] * 3
    containers = {e["container"]: e for e in engines}
    assert len(containers) == 7
    for engine in containers.values():
        name = f"pool {engine['pool']['name']}" if engine.get("pool") else engine["name"]
        labels = f'model="{name}",engine="{engine["engine"]}",container="{engine["container"]}"'
        assert f"cortex_model_up{{{labels}}} 1" in metrics
    assert 'cortex_gateway_healthz_up{url="http://127.0.0.1:80/healthz"} 1' in metrics
    assert "cortex_nginx_up 1" in metrics
    assert "all 7 engine(s) and the gateway healthy" in journal(host, "cortex-healthcheck")


# The public nginx site, as clients reach it.
SITE = GATEWAY_URL.removesuffix("/v1")


def test_the_admin_api_is_not_on_the_public_site(client_key):
    # From outside the host, over the public site's plain HTTP: never the admin API.
    for path in ("/admin/status.json", "/admin/backends", "/admin/usage"):
        for key in (client_key, admin_key()):
            headers = {"Authorization": f"Bearer {key}"}
            answer = requests.get(f"{SITE}{path}", headers=headers, timeout=10)
            assert answer.status_code in (403, 404), (path, answer.status_code, answer.text)
    drain = requests.post(
        f"{SITE}/admin/backends/drain",
        json={"backend": "127.0.0.1:18080"},
        headers={"Authorization": f"Bearer {admin_key()}"},
        timeout=10,
    )
    assert drain.status_code in (403, 404)


def test_the_status_page_is_for_admins_over_tls_from_allowed_addresses(host, client_key):
    https = "https://127.0.0.1/admin/status.json"
    assert admin_get(host, https, client_key)[0] == 403
    status, body = admin_get(host, https, admin_key())
    assert status == 200, body
    models = {m["name"]: m for m in json.loads(body)["models"]}
    assert models[MODEL]["ready"] == 2
    assert models[EMBEDDING_MODEL]["ready"] == 1
    # The same site over plain HTTP refuses it, even from an allowed address.
    assert admin_get(host, "http://127.0.0.1/admin/status.json", admin_key())[0] == 403
    # The admin listener itself, on the host's loopback.
    status, page = admin_get(host, "http://127.0.0.1:8001/admin/status", "")
    assert status == 200
    assert "status.json" in page


def test_the_status_playbook_prints_the_fleet_table():
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(root / "playbooks/status.yml")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if "cortex-molecule" in line and "llamacpp" in line]
    assert len(rows) == 4  # two chat replicas, the embedding model and the pool
    assert all("running" in row and "healthy" in row and "<-" not in row for row in rows)


def test_a_conversations_next_turn_returns_to_its_llamacpp_replica(host, client):
    """Prefix affinity with the real gateway (one worker per core) and both
    SmolLM2 replicas: llama-server reports the cached prompt tokens."""
    assert_turns_return_to_their_replica(host, client, MODEL)
