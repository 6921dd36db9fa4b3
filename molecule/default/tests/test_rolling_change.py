"""A changed inventory converged under load: only the changed model's containers
are recreated, one replica at a time, each drained in the gateway first, and
clients looping requests and streams through the gateway meanwhile see no
failure: no request refused, no stream cut. Runs last: it leaves the changed
inventory converged."""

from __future__ import annotations

import json

import openai
from scenario import (
    GATEWAY_URL,
    assert_no_failures,
    assert_replaced_one_at_a_time,
    changed_models,
    converge_under_load,
)

MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
CONTAINERS = [f"cortex-{MODEL}-0", f"cortex-{MODEL}-1", f"cortex-{EMBEDDING_MODEL}-0"]


def container_ids(host) -> dict[str, str]:
    return {name: json.loads(host.check_output(f"docker inspect {name}"))[0]["Id"] for name in CONTAINERS}


def test_a_changed_model_is_replaced_one_replica_at_a_time_without_failures(host, client_key, tmp_path):
    before = container_ids(host)
    client = openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=60, max_retries=0)
    result, loop, streams = converge_under_load(
        client, MODEL, changed_models(tmp_path, MODEL, "llamacpp", "ctx_size", 6144), "site.yml"
    )
    assert_replaced_one_at_a_time(result, CONTAINERS[:2], "cortex-molecule")
    after = container_ids(host)
    assert after[f"cortex-{EMBEDDING_MODEL}-0"] == before[f"cortex-{EMBEDDING_MODEL}-0"], (
        "the unchanged model restarted"
    )
    assert after[f"cortex-{MODEL}-0"] != before[f"cortex-{MODEL}-0"]
    assert after[f"cortex-{MODEL}-1"] != before[f"cortex-{MODEL}-1"]
    assert_no_failures(loop, streams)
    inspect = json.loads(host.check_output(f"docker inspect cortex-{MODEL}-0"))[0]
    assert "6144" in inspect["Config"]["Cmd"]
