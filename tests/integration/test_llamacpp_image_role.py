"""The llamacpp_image role's decisions from gpu_facts, run for real against
local hosts with given GPU facts (an L40S on driver 535, an H100 on 580):
the backend and architectures of the tag, and the refusal of a CUDA version
that a host's driver cannot run. Only the always-tagged tasks run: nothing is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
L40S = {"driver_present": True, "driver_version": "535.247.01", "cuda_driver_version": "12.2",
        "gpus": [{"index": 0, "cuda_arch": "89"}]}  # fmt: skip
H100 = {"driver_present": True, "driver_version": "580.159.04", "cuda_driver_version": "13.0",
        "gpus": [{"index": 0, "cuda_arch": "90"}]}  # fmt: skip
NO_GPU = {"driver_present": False, "reason": "no NVIDIA driver", "gpus": []}
PLAY = [
    {
        "hosts": "all",
        "gather_facts": False,
        "roles": ["cortex.serving.llamacpp_image"],
        "post_tasks": [
            {"ansible.builtin.debug": {"msg": "REF={{ llamacpp_image_ref }}"}, "tags": ["always"]}
        ],
    }
]


def run(tmp_path: Path, hosts: dict, *extra: str) -> subprocess.CompletedProcess:
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {
        "all": {"vars": local, "hosts": {name: {"cortex_gpus": facts} for name, facts in hosts.items()}}
    }
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "play.yml").write_text(yaml.safe_dump(PLAY))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    return subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(tmp_path / "hosts.yml"),
         str(tmp_path / "play.yml"), "--tags", "always", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_tag_carries_every_architecture_of_the_fleet(tmp_path):
    result = run(tmp_path, {"l40s": L40S, "h100": H100}, "-e", "llamacpp_image_cuda_version=12.2.2")
    assert result.returncode == 0, result.stdout
    assert "REF=cortex/llamacpp-server:0c1e570-cuda-sm89-90" in result.stdout


def test_hosts_without_gpus_get_the_cpu_image(tmp_path):
    result = run(tmp_path, {"cpu": NO_GPU})
    assert result.returncode == 0, result.stdout
    assert "REF=cortex/llamacpp-server:0c1e570-cpu" in result.stdout


def test_architectures_can_be_given(tmp_path):
    result = run(tmp_path, {"h100": H100}, "-e", "llamacpp_image_cuda_architectures=89;90;100")
    assert "REF=cortex/llamacpp-server:0c1e570-cuda-sm89-90-100" in result.stdout


def test_a_cuda_version_newer_than_the_driver_is_refused(tmp_path):
    result = run(tmp_path, {"l40s": L40S, "h100": H100})
    assert result.returncode != 0
    assert (
        "l40s: the NVIDIA driver 535.247.01 runs CUDA up to 12.2, but llamacpp_image_cuda_version is 12.8.1"
        in result.stdout
    )
    assert "Set llamacpp_image_cuda_version to 12.2 or older, or upgrade the driver" in result.stdout
