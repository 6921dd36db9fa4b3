"""One changed inventory converged under load, as an operator changes a
fleet: a llama.cpp model (an option, and 2 replicas -> 1), a vLLM model (an
option) and the gateway's admin port, in one run of site.yml while clients
loop requests and streams to both models through the gateway. Only the
changed models' containers are recreated, one replica at a time, each
drained in the gateway first and put back once it answers again; a replica
no longer wanted is drained before it is removed; the clients see no
failure: no request refused, no stream cut. Runs last (conftest.py orders
it): it leaves the changed inventory converged."""

from __future__ import annotations

import json

import openai
import pytest
import yaml
from rollouts import assert_replaced_one_at_a_time
from scenario import (
    GATEWAY_URL,
    Load,
    admin_base,
    admin_get,
    admin_key,
    assert_no_failures,
    changed_models,
    converge_under_load,
)

HOST = "cortex-molecule"
MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
CONTAINERS = [f"cortex-{MODEL}-0", f"cortex-{MODEL}-1", f"cortex-{EMBEDDING_MODEL}-0"]
VLLM_MODEL = "smollm2-135m-vllm"
VLLM_REPLICAS = [f"cortex-{VLLM_MODEL}-0", f"cortex-{VLLM_MODEL}-1"]
# Models the converge must not touch.
VLLM_EMBEDDING = "cortex-all-minilm-l6-v2-vllm-0"


def container_ids(host, names) -> dict[str, str]:
    return {name: json.loads(host.check_output(f"docker inspect {name}"))[0]["Id"] for name in names}


def gateway_pid(host) -> str:
    return host.check_output("systemctl show --property MainPID --value cortex-gateway")


@pytest.fixture(scope="module")
def changed(host, client_key, tmp_path_factory):
    """The one converge, with what the tests compare it to."""
    before = container_ids(host, (*CONTAINERS, *VLLM_REPLICAS, VLLM_EMBEDDING))
    pid_before = gateway_pid(host)
    admin_before = admin_base(host)
    folder = tmp_path_factory.mktemp("changed")
    changed_models(folder, MODEL, "llamacpp", "ctx_size", 6144, replicas=1)
    extra_vars = changed_models(folder, VLLM_MODEL, "vllm", "max_model_len", 1536)
    moved = {**yaml.safe_load(extra_vars.read_text()), "gateway_admin_listen_port": 8011}
    extra_vars.write_text(yaml.safe_dump(moved))
    # vLLM answers slower than llama.cpp on CPU, and its replica restarts while the other serves.
    llama = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=60, max_retries=0)
    vllm = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=120, max_retries=0)
    # One vLLM stream at a time beside its requests: on 2 cores, the replica
    # left serving must leave a starting vLLM some CPU.
    loads = {MODEL: Load(llama, MODEL), VLLM_MODEL: Load(vllm, VLLM_MODEL, stream_threads=1)}
    result = converge_under_load(list(loads.values()), extra_vars, "site.yml")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return {"before": before, "pid": pid_before, "admin": admin_before, "result": result, "loads": loads}


def test_a_changed_model_is_replaced_and_scaled_down_drained_without_failures(host, changed):
    """Its option changed and its replicas 2 -> 1: replica 0 is drained,
    replaced and put back; then replica 1, no longer planned, is drained and
    removed. The clients see no failure through either.

    The same converge moves the gateway's admin API to another port, which
    only a restart applies: the drains (before the gateway's own play) reach
    the running gateway where it listens, and the gateway is then restarted
    on the new port, with nginx in step."""
    result, before = changed["result"], changed["before"]
    assert changed["admin"] == "http://127.0.0.1:8001"
    replaced, removed = CONTAINERS[0], CONTAINERS[1]
    waited = assert_replaced_one_at_a_time(result, [replaced], HOST, removed=(removed,))
    log = result.stdout
    drained = log.find(f"Drain it in the gateways first: {removed}")
    assert drained > log.find(f"Put it back in the gateways: {replaced}"), "the surplus was drained too early"
    assert host.run(f"docker inspect {removed}").rc != 0, f"{removed} is still there"
    after = container_ids(host, (replaced, CONTAINERS[2], VLLM_EMBEDDING))
    for name in (CONTAINERS[2], VLLM_EMBEDDING):
        assert after[name] == before[name], f"{name} of an unchanged model restarted"
    assert after[replaced] != before[replaced]
    load = changed["loads"][MODEL]
    assert_no_failures(load.loop, load.streams)
    # The load was on the replicas as they were drained: a drain waited for
    # requests in flight (each says how many there were when it began).
    assert sum(waited) > 0, f"no drain had a request in flight to wait for: {waited}"
    inspect = json.loads(host.check_output(f"docker inspect {replaced}"))[0]
    assert "6144" in inspect["Config"]["Cmd"]
    # Restarted (a reload would have kept the old admin listener), on the new port.
    assert "Restart cortex-gateway for settings only a restart applies" in log
    assert gateway_pid(host) != changed["pid"]
    assert admin_base(host) == "http://127.0.0.1:8011"
    assert admin_get(host, "http://127.0.0.1:8011/admin/backends", admin_key())[0] == 200
    assert host.run("curl -s -o /dev/null http://127.0.0.1:8001/").rc != 0, "the old admin port still answers"
    # nginx moved with it: the status page over TLS answers.
    assert admin_get(host, "https://127.0.0.1/admin/status.json", admin_key())[0] == 200


def test_a_changed_vllm_model_is_replaced_one_replica_at_a_time_without_failures(host, changed):
    result, before = changed["result"], changed["before"]
    waited = assert_replaced_one_at_a_time(result, VLLM_REPLICAS, HOST)
    assert sum(waited) > 0, f"no drain had a request in flight to wait for: {waited}"
    after = container_ids(host, (*VLLM_REPLICAS, VLLM_EMBEDDING))
    assert after[VLLM_EMBEDDING] == before[VLLM_EMBEDDING], f"{VLLM_EMBEDDING} restarted"
    for name in VLLM_REPLICAS:
        assert after[name] != before[name], f"{name} was not replaced"
    load = changed["loads"][VLLM_MODEL]
    assert_no_failures(load.loop, load.streams)
    command = json.loads(host.check_output(f"docker inspect {VLLM_REPLICAS[0]}"))[0]["Config"]["Cmd"]
    assert command[command.index("--max-model-len") + 1] == "1536"
