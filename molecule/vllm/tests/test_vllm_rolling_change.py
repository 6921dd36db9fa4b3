"""The vLLM model changed under load: only its containers are recreated, one
replica at a time, each drained in the gateway first and put back once vLLM
answers again, while clients looping requests and streams through the
gateway see no failure. Runs last: it leaves the changed inventory converged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import yaml
from conftest import GATEWAY_URL, RequestLoop

MODEL = "smollm2-135m-vllm"
UNCHANGED = ["cortex-all-minilm-l6-v2-vllm-0", "cortex-smollm2-135m-llamacpp-0"]
REPLICAS = [f"cortex-{MODEL}-0", f"cortex-{MODEL}-1"]
PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
# Bounds of the load loops: they stop when the converge ends, or at these.
MAX_REQUESTS = 3000
MAX_SECONDS = 900


def container_ids(host) -> dict[str, str]:
    return {
        name: json.loads(host.check_output(f"docker inspect {name}"))[0]["Id"]
        for name in REPLICAS + UNCHANGED
    }


def changed_inventory(tmp_path: Path) -> Path:
    group_vars = yaml.safe_load((Path(__file__).resolve().parents[1] / "group_vars" / "all.yml").read_text())
    models = group_vars["cortex_models"]
    chat = next(m for m in models if m["name"] == MODEL)
    chat["vllm"]["max_model_len"] = 1536  # a change the gateway's routes do not see
    path = tmp_path / "changed.yml"
    path.write_text(yaml.safe_dump({"cortex_models": models}))
    return path


def test_a_changed_vllm_model_is_replaced_one_replica_at_a_time_without_failures(host, client_key, tmp_path):
    before = container_ids(host)
    client = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=120, max_retries=0)
    inventory = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory"
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(PROJECT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(PROJECT / ".cache" / "collections"),
        "ANSIBLE_FORCE_COLOR": "0",
    }
    with (
        RequestLoop(client, MODEL, max_requests=MAX_REQUESTS, max_seconds=MAX_SECONDS) as loop,
        RequestLoop(client, MODEL, threads=2, max_requests=MAX_REQUESTS, max_seconds=MAX_SECONDS,
                    stream=True) as streams,
    ):  # fmt: skip
        result = subprocess.run(
            [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory),
             "-e", f"@{changed_inventory(tmp_path)}", str(PROJECT / "playbooks" / "models.yml")],
            cwd=PROJECT, env=env, capture_output=True, text=True, timeout=MAX_SECONDS, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    after = container_ids(host)
    for name in UNCHANGED:
        assert after[name] == before[name], f"{name} restarted"
    for name in REPLICAS:
        assert after[name] != before[name], f"{name} was not replaced"
    log = result.stdout
    steps = [
        f"Drain it in the gateways first: {REPLICAS[0]}",
        f"Run {REPLICAS[0]}",
        f"Wait until /health answers 200: {REPLICAS[0]}",
        f"Put it back in the gateways: {REPLICAS[0]}",
        f"Drain it in the gateways first: {REPLICAS[1]}",
        f"Run {REPLICAS[1]}",
        f"Put it back in the gateways: {REPLICAS[1]}",
    ]
    positions = [log.find(step) for step in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions, strict=True) if p == -1]
    assert positions == sorted(positions), positions
    assert log.count("cortex-vllm: drained, no request in flight") == 2, log[-4000:]
    assert log.count("cortex-vllm: routes to it again") == 2, log[-4000:]

    assert len(loop.outcomes) >= 10, f"the load loop made only {len(loop.outcomes)} requests"
    assert loop.failures == [], (
        f"{len(loop.failures)} of {len(loop.outcomes)} requests failed: {loop.failures[:5]}"
    )
    assert len(streams.outcomes) >= 10, f"the stream loop made only {len(streams.outcomes)} streams"
    assert streams.failures == [], (
        f"{len(streams.failures)} of {len(streams.outcomes)} streams failed: {streams.failures[:5]}"
    )
    command = json.loads(host.check_output(f"docker inspect {REPLICAS[0]}"))[0]["Config"]["Cmd"]
    assert command[command.index("--max-model-len") + 1] == "1536"
