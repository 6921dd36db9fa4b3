"""A changed inventory converged under load: only the changed model's containers
are recreated, one replica at a time, each drained in the gateway first, a
replica no longer wanted is drained before it is removed, and clients looping
requests and streams through the gateway meanwhile see no failure: no request
refused, no stream cut. Runs last: it leaves the changed inventory converged."""

from __future__ import annotations

import json

import openai
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

MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
CONTAINERS = [f"cortex-{MODEL}-0", f"cortex-{MODEL}-1", f"cortex-{EMBEDDING_MODEL}-0"]
# The vLLM models beside them are not touched either.
VLLM_CONTAINERS = [
    "cortex-smollm2-135m-vllm-0",
    "cortex-smollm2-135m-vllm-1",
    "cortex-all-minilm-l6-v2-vllm-0",
]


def container_ids(host, names: tuple[str, ...] = tuple(CONTAINERS)) -> dict[str, str]:
    return {name: json.loads(host.check_output(f"docker inspect {name}"))[0]["Id"] for name in names}


def gateway_pid(host) -> str:
    return host.check_output("systemctl show --property MainPID --value cortex-gateway")


def test_a_changed_model_is_replaced_and_scaled_down_drained_without_failures(host, client_key, tmp_path):
    """Its option changed and its replicas 2 -> 1 in one converge: replica 0 is
    drained, replaced and put back; then replica 1, no longer planned, is
    drained and removed. The clients see no failure through either.

    The same converge moves the gateway's admin API to another port, which
    only a restart applies: the drains (before the gateway's own play) reach
    the running gateway where it listens, and the gateway is then restarted
    on the new port, with nginx in step."""
    before = container_ids(host, (*CONTAINERS, *VLLM_CONTAINERS))
    pid_before = gateway_pid(host)
    assert admin_base(host) == "http://127.0.0.1:8001"
    changed = changed_models(tmp_path, MODEL, "llamacpp", "ctx_size", 6144, replicas=1)
    moved = {**yaml.safe_load(changed.read_text()), "gateway_admin_listen_port": 8011}
    changed.write_text(yaml.safe_dump(moved))
    client = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=60, max_retries=0)
    load = Load(client, MODEL)
    result = converge_under_load(load, changed, "site.yml")
    replaced, removed = CONTAINERS[0], CONTAINERS[1]
    waited = assert_replaced_one_at_a_time(result, [replaced], "cortex-molecule", removed=(removed,))
    # The load was on the replicas as they were drained: a drain waited for
    # requests in flight (each says how many there were when it began).
    assert sum(waited) > 0, f"no drain had a request in flight to wait for: {waited}"
    log = result.stdout
    drained = log.find(f"Drain it in the gateways first: {removed}")
    put_back = log.find(f"Put it back in the gateways: {replaced}")
    assert drained > put_back, "the surplus replica was not drained after the replacement"
    assert log.find(f"Remove it: {removed}") > drained
    assert host.run(f"docker inspect {removed}").rc != 0, f"{removed} is still there"
    after = container_ids(host, (replaced, CONTAINERS[2], *VLLM_CONTAINERS))
    for name in (CONTAINERS[2], *VLLM_CONTAINERS):
        assert after[name] == before[name], f"{name} of an unchanged model restarted"
    assert after[replaced] != before[replaced]
    assert_no_failures(load.loop, load.streams)
    inspect = json.loads(host.check_output(f"docker inspect {replaced}"))[0]
    assert "6144" in inspect["Config"]["Cmd"]
    # Restarted (a reload would have kept the old admin listener), on the new port.
    assert "Restart cortex-gateway for settings only a restart applies" in result.stdout
    assert gateway_pid(host) != pid_before
    assert admin_base(host) == "http://127.0.0.1:8011"
    assert admin_get(host, "http://127.0.0.1:8011/admin/backends", admin_key())[0] == 200
    assert host.run("curl -s -o /dev/null http://127.0.0.1:8001/").rc != 0, "the old admin port still answers"
    # nginx moved with it: the status page over TLS answers.
    assert admin_get(host, "https://127.0.0.1/admin/status.json", admin_key())[0] == 200
