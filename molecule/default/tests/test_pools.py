"""A pool of on-demand models deployed by the collection: one llama-server in
router mode with two SmolLM2 models, at most one loaded at once, behind the
gateway and nginx. Requests that alternate between them (the openai client)
are each answered by the model they asked for, while the router loads one
and unloads the other."""

from __future__ import annotations

import json

import openai
import pytest
from scenario import GATEWAY_URL, gateway_series

POOL = "on-demand"
MODELS = ("smollm2-on-demand", "smollm2-on-demand-brief")
STATES = {"loaded", "loading", "sleeping", "unloaded"}


@pytest.fixture
def client(client_key):
    return openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=180, max_retries=0)


def test_the_pool_is_one_router_container_with_its_models_in_a_preset(host):
    names = host.check_output(f"docker ps --filter label=io.cortex.model={POOL} --format '{{{{.Names}}}}'")
    assert names.split() == [f"cortex-{POOL}-0"]
    info = json.loads(host.check_output(f"docker inspect cortex-{POOL}-0"))[0]
    command = info["Config"]["Cmd"]
    assert command[command.index("--models-max") + 1] == "1"
    assert command[command.index("--models-preset") + 1] == "/etc/cortex-pool/models.ini"
    assert "--model" not in command  # router mode: started without a model
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert mounts["/etc/cortex-pool/models.ini"]["Source"] == f"/var/lib/cortex/models/.pools/{POOL}.ini"
    for model in MODELS:
        assert mounts[f"/models/{model}"]["Source"] == f"/var/lib/cortex/models/{model}"
    assert all(m["RW"] is False for m in mounts.values())
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    preset = host.file(f"/var/lib/cortex/models/.pools/{POOL}.ini").content_string
    assert (
        "[smollm2-on-demand]\nmodel = /models/smollm2-on-demand/SmolLM2-135M-Instruct.Q4_1.gguf\n" in preset
    )
    assert "[smollm2-on-demand-brief]\n" in preset
    assert "sleep-idle-seconds = 600\n" in preset


def test_alternating_requests_are_each_answered_by_the_model_they_asked_for(host, client):
    outcomes: dict[str, int] = {}
    for turn in range(6):
        model = MODELS[turn % 2]
        try:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
            )
            outcome = "ok" if reply.model == model and reply.choices[0].message.content else f"answer {reply}"
        except openai.OpenAIError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes == {"ok": 6}
    # Every answer after the first needed the other model unloaded and its own loaded.
    loads = sum(
        sum(gateway_series(host, "cortex_gateway_model_loads_total", model=m, result="loaded").values())
        for m in MODELS
    )
    evictions = sum(
        sum(gateway_series(host, "cortex_gateway_model_evictions_total", model=m).values()) for m in MODELS
    )
    assert loads >= 5
    assert evictions >= 4


def test_models_says_each_pool_models_state(client):
    cards = {m.id: m.model_extra for m in client.models.list().data}
    states = {name: cards[name]["status"]["value"] for name in MODELS}
    assert set(states.values()) <= STATES, states
    assert list(states.values()).count("loaded") <= 1, states
    # A model always resident has no such state.
    assert "status" not in cards["smollm2-135m-instruct"]
