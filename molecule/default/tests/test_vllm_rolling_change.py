"""The vLLM model changed under load: only its containers are recreated, one
replica at a time, each drained in the gateway first and put back once vLLM
answers again, while clients looping requests and streams through the
gateway see no failure. Runs last (after the llama.cpp rolling change, whose
inventory it starts from): it leaves the changed inventory converged."""

from __future__ import annotations

import json

import openai
from rollouts import assert_replaced_one_at_a_time
from scenario import (
    GATEWAY_URL,
    Load,
    assert_no_failures,
    changed_models,
    converge_under_load,
)

MODEL = "smollm2-135m-vllm"
# The other models, as the llama.cpp rolling change left them.
UNCHANGED = ["cortex-all-minilm-l6-v2-vllm-0", "cortex-smollm2-135m-instruct-0", "cortex-all-minilm-l6-v2-0"]
REPLICAS = [f"cortex-{MODEL}-0", f"cortex-{MODEL}-1"]


def container_ids(host) -> dict[str, str]:
    return {
        name: json.loads(host.check_output(f"docker inspect {name}"))[0]["Id"]
        for name in REPLICAS + UNCHANGED
    }


def test_a_changed_vllm_model_is_replaced_one_replica_at_a_time_without_failures(host, client_key, tmp_path):
    before = container_ids(host)
    client = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=120, max_retries=0)
    # One stream at a time beside the requests: on 2 cores, the replica left
    # serving must leave a starting vLLM some CPU.
    load = Load(client, MODEL, stream_threads=1)
    result = converge_under_load(
        load, changed_models(tmp_path, MODEL, "vllm", "max_model_len", 1536), "models.yml"
    )
    waited = assert_replaced_one_at_a_time(result, REPLICAS, "cortex-molecule")
    assert sum(waited) > 0, f"no drain had a request in flight to wait for: {waited}"
    after = container_ids(host)
    for name in UNCHANGED:
        assert after[name] == before[name], f"{name} restarted"
    for name in REPLICAS:
        assert after[name] != before[name], f"{name} was not replaced"
    assert_no_failures(load.loop, load.streams)
    command = json.loads(host.check_output(f"docker inspect {REPLICAS[0]}"))[0]["Config"]["Cmd"]
    assert command[command.index("--max-model-len") + 1] == "1536"
