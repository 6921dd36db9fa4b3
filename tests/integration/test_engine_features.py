"""LoRA adapters and speculative decoding with the real llama-server this
project builds, SmolLM2 on CPU, started from the command lines and mounts the
collection renders, behind the gateway.

- An adapter (a real-format GGUF LoRA written with gguf-py, random low-rank
  weights) is served under its own name: the same greedy prompt answers
  otherwise with it than without, the base model answers as before while
  adapter requests run in the other slot, and an unknown adapter is a 404.
- SmolLM2 as its own draft: greedy answers are the same with and without
  speculation, and llama-server reports the draft tokens it accepted.
- Every flag the features render is in llama-server's --help.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
import urllib.request

import gguf
import pytest
from ansible_collections.cortex.serving.plugins.module_utils._engine_command import API_KEY_FILE
from ansible_collections.cortex.serving.plugins.module_utils._features import LLAMACPP_METHODS
from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import read_gguf_info
from ansible_collections.cortex.serving.plugins.module_utils._models import host_instances, instance_endpoints

from tests.lora_adapters import write_gguf_lora

from ..unit.gateway.conftest import AUTH, ENGINE_KEY, make_config
from ..unit.gateway.test_resilience import wait_ready
from .conftest import docker
from .test_llamacpp_engine import help_flags  # noqa: F401  # pylint: disable=unused-import

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
COUNT_PROMPT = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
# What n-gram speculation can draft: an answer that repeats its prompt.
REPEAT_PROMPT = [
    {"role": "user", "content": "Repeat this line three times: the cat sat on the mat and looked at the hat."}
]


@pytest.fixture(scope="module")
def files(smollm2_gguf, tmp_path_factory):
    """The model and a LoRA adapter for it, in folders the engine user can read."""
    folder = tmp_path_factory.mktemp("features")
    models, adapters = folder / "models", folder / "adapters"
    for path in (folder, models, adapters):
        path.mkdir(exist_ok=True)
        path.chmod(0o755)
    model = models / smollm2_gguf.name
    shutil.copyfile(smollm2_gguf, model)
    adapter = write_gguf_lora(model, adapters / "pirate.gguf", rank=8, std=0.1, seed=1)
    for path in (model, adapter):
        path.chmod(0o644)
    key = folder / "api-key"
    key.write_text(ENGINE_KEY)
    key.chmod(0o644)
    return {"model": model, "adapter": adapter, "key": key}


def run_instance(image, instance, files) -> str:
    """The instance's container as the role runs it: read-only, no capabilities,
    the model folder and the extra mounts read-only, the key file."""
    mounts = ["-v", f"{files['model'].parent}:/models:ro", "-v", f"{files['key']}:{API_KEY_FILE}:ro"]
    for mount in instance["extra_mounts"]:
        mounts += ["-v", f"{mount['source']}:{mount['target']}:ro"]
    name = f"cortex-it-{secrets.token_hex(4)}"
    docker(
        "run", "-d", "--name", name, "--user", "10001:10001", "--read-only", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "-p", "127.0.0.1::8080", *mounts, image, *instance["command"],
    )  # fmt: skip
    return name


def wait_healthy(name: str) -> str:
    port = docker("port", name, "8080/tcp").stdout.strip().rsplit(":", 1)[1]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:  # noqa: S310 - loopback
                if answer.status == 200:
                    return url
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(docker("logs", name, check=False).stderr[-3000:])


def instance_of(model: dict) -> dict:
    return host_instances([model], "it-host", 0)["instances"][0]


def test_every_feature_flag_is_a_llama_server_flag(help_flags):  # noqa: F811
    flags = {"--lora-scaled", "--spec-type", "--spec-draft-model", "--spec-draft-ngl", "--spec-draft-device"}
    flags |= {"--spec-draft-type-k", "--spec-draft-type-v"}
    for knobs in LLAMACPP_METHODS.values():
        flags |= {flag for key, flag in knobs.items() if key != "type"}
    assert sorted(flags - help_flags) == []


def test_every_speculative_type_is_llama_servers(llamacpp_image):
    text = docker("run", "--rm", llamacpp_image, "--help").stdout
    line = next(line for line in text.splitlines() if "--spec-type" in line)
    for knobs in LLAMACPP_METHODS.values():
        assert knobs["type"] in line, knobs["type"]


async def chat(client, model: str, messages, max_tokens: int = 24) -> tuple[int, dict]:
    answer = await client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
        headers=AUTH,
    )
    return answer.status, await answer.json()


async def test_an_adapter_is_served_by_name_through_the_gateway(llamacpp_image, files, gateway_client):
    model = {
        "name": "smollm2",
        "engine": "llamacpp",
        "source": {"path": str(files["model"])},
        "adapters": [{"name": "smollm2-pirate", "source": {"path": str(files["adapter"])}}],
        "llamacpp": {"parallel": 2, "ctx_per_slot": 1024, "threads": 2, "seed": 7},
    }
    instance = instance_of(model)
    # What gguf_info reads of the adapter passes the role's check.
    shapes = {
        "smollm2": read_gguf_info(str(files["model"]), gguf),
        "smollm2+lora+smollm2-pirate": read_gguf_info(str(files["adapter"]), gguf),
    }
    host_instances([model], "it-host", 0, shapes=shapes)
    name = run_instance(llamacpp_image, instance, files)
    try:
        url = wait_healthy(name)
        endpoint = instance_endpoints([dict(instance, url=url)])[0]
        config = make_config({"smollm2": [url]})
        config["models"][0]["adapters"] = endpoint["adapters"]
        config["models"][0]["backends"][0]["max_concurrency"] = 2
        config["timeouts"] = {"first_byte": 120, "idle": 60}
        client = await gateway_client(config)
        await wait_ready(client, "smollm2", 1)

        status, base = await chat(client, "smollm2", PROMPT)
        assert status == 200, base
        status, pirate = await chat(client, "smollm2-pirate", PROMPT)
        assert status == 200, pirate
        base_text = base["choices"][0]["message"]["content"]
        pirate_text = pirate["choices"][0]["message"]["content"]
        assert pirate_text != base_text

        # Both slots busy at once, one with the adapter: the base answers are
        # unchanged. (The adapter's own greedy answer may differ in a late
        # token: random low-rank weights leave near-ties that the batch's
        # shape can tip.)
        together = await asyncio.gather(
            chat(client, "smollm2-pirate", PROMPT),
            chat(client, "smollm2", PROMPT),
            chat(client, "smollm2", PROMPT),
        )
        assert [status for status, _body in together] == [200, 200, 200]
        assert together[0][1]["choices"][0]["message"]["content"] != base_text
        assert [body["choices"][0]["message"]["content"] for _s, body in together[1:]] == [base_text] * 2
        # And after the adapter ran in a slot, that slot's next base answer too.
        status, again = await chat(client, "smollm2", PROMPT)
        assert again["choices"][0]["message"]["content"] == base_text

        status, unknown = await chat(client, "smollm2-sailor", PROMPT)
        assert status == 404
        assert unknown["error"]["code"] == "model_not_found"
        listed = {
            card["id"]: card for card in (await (await client.get("/v1/models", headers=AUTH)).json())["data"]
        }
        assert listed["smollm2-pirate"]["parent"] == "smollm2"
    finally:
        docker("rm", "-f", name, check=False)


def test_smollm2_as_its_own_draft_answers_the_same_and_accepts_drafts(llamacpp_image, files):
    base = {
        "name": "smollm2",
        "engine": "llamacpp",
        "source": {"path": str(files["model"])},
        "llamacpp": {"parallel": 1, "ctx_size": 1024, "threads": 2, "seed": 7},
    }
    drafted = {
        **base,
        "speculative": {"draft": {"source": {"path": str(files["model"])}}, "max_tokens": 8, "p_min": 0.0},
    }
    ngram = {
        **base,
        "speculative": {"method": "ngram-mod", "max_tokens": 16, "min_tokens": 1, "ngram_size": 4},
    }
    answers = {}
    for label, model in (("plain", base), ("draft", drafted), ("ngram", ngram)):
        instance = instance_of(model)
        name = run_instance(llamacpp_image, instance, files)
        try:
            url = wait_healthy(name)
            for prompt, messages in (("count", COUNT_PROMPT), ("repeat", REPEAT_PROMPT)):
                body = json.dumps(
                    {"messages": messages, "max_tokens": 48, "temperature": 0, "cache_prompt": False}
                ).encode()
                request = urllib.request.Request(  # noqa: S310 - loopback
                    url + "/v1/chat/completions",
                    data=body,
                    headers={"Authorization": f"Bearer {ENGINE_KEY}", "Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=120) as answer:  # noqa: S310
                    answers[label, prompt] = json.loads(answer.read())
        finally:
            docker("rm", "-f", name, check=False)
    texts = {key: answer["choices"][0]["message"]["content"] for key, answer in answers.items()}
    for prompt in ("count", "repeat"):
        assert texts["draft", prompt] == texts["plain", prompt]
        assert texts["ngram", prompt] == texts["plain", prompt]
        assert "draft_n" not in answers["plain", prompt]["timings"]
    timings = answers["draft", "count"]["timings"]
    # The draft is the model itself: every token it drafts is accepted.
    assert timings["draft_n"] > 0
    assert timings["draft_n_accepted"] == timings["draft_n"]
    # An answer that repeats its prompt is drafted from the prompt's n-grams.
    assert answers["ngram", "repeat"]["timings"]["draft_n_accepted"] > 0
