"""LoRA adapters deployed by the collection and served as model names: the
adapter file fetched into its own folder and mounted read-only, each engine
told of it (llama.cpp at scale 0, vLLM by name), and the gateway answering
for it with the openai client: otherwise than the base model, which answers
as before."""

from __future__ import annotations

import json

import openai
import pytest
from scenario import GATEWAY_URL

# Each adapter and its base model (the adapters are random low-rank weights).
ADAPTERS = {"smollm2-135m-pirate": "smollm2-135m-instruct", "smollm2-135m-vllm-pirate": "smollm2-135m-vllm"}
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture
def client(client_key):
    return openai.OpenAI(base_url=GATEWAY_URL, api_key=client_key, timeout=120, max_retries=0)


def ask(client, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0
    )
    assert reply.usage.completion_tokens > 0
    return (reply.choices[0].message.content or "").strip()


def test_models_lists_each_adapter_with_its_parent(client):
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert {name: cards.get(name, {}).get("parent") for name in ADAPTERS} == ADAPTERS
    assert "parent" not in cards["smollm2-135m-instruct"]


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_an_adapter_answers_otherwise_and_its_base_model_as_before(client, adapter):
    base = ADAPTERS[adapter]
    before = ask(client, base)
    assert ask(client, adapter) != before
    # Every replica's slots, after the adapter ran in one: the base answer holds.
    assert {ask(client, base) for _turn in range(4)} == {before}


def test_an_unknown_adapter_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, "smollm2-135m-sailor")
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("replica", [0, 1])
def test_the_adapter_is_mounted_read_only_and_loaded_at_scale_zero(host, replica):
    info = json.loads(host.check_output(f"docker inspect cortex-smollm2-135m-instruct-{replica}"))[0]
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    adapter = mounts["/adapters/smollm2-135m-pirate"]
    assert adapter["RW"] is False
    assert adapter["Source"] == "/var/lib/cortex/models/smollm2-135m-instruct+lora+smollm2-135m-pirate"
    command = info["Config"]["Cmd"]
    assert (
        command[command.index("--lora-scaled") + 1]
        == "/adapters/smollm2-135m-pirate/smollm2-135m-pirate.gguf:0"
    )
    # A changed adapter file replaces the replicas, as a changed model file does.
    assert len(info["Config"]["Labels"]["io.cortex.features"]) == 40


def test_vllm_serves_the_adapter_under_its_name(host):
    info = json.loads(host.check_output("docker inspect cortex-smollm2-135m-vllm-0"))[0]
    command = info["Config"]["Cmd"]
    assert "--enable-lora" in command
    assert (
        command[command.index("--lora-modules") + 1]
        == "smollm2-135m-vllm-pirate=/adapters/smollm2-135m-vllm-pirate"
    )
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert mounts["/adapters/smollm2-135m-vllm-pirate"]["RW"] is False
    files = host.check_output(
        "ls /var/lib/cortex/models/smollm2-135m-vllm+lora+smollm2-135m-vllm-pirate"
    ).split()
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
