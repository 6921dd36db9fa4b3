"""The gguf_info and model_plan modules, run by ansible-playbook as the role runs them.

A gpt-oss-120b of the published file's shape (sparse: no disk) planned for one
L40S: the play fails, its message names the n_cpu_moe that would fit, and the
same play with that setting passes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gguf_shapes import write_gguf

from .conftest import ROOT

PLAY = """
- name: Plan a model as model_servers plans it
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Read the GGUF metadata
      cortex.serving.gguf_info:
        path: "{{ model_path }}"
      register: shape

    - name: Plan the GPU memory
      cortex.serving.model_plan:
        instances: "{{ (cortex_models | cortex.serving.model_instances('gpu-a', 1, {}, shapes)).instances }}"
        shapes: "{{ shapes }}"
        gpus: [{index: 0, memory_total_mib: 46068}]
        host_memory_mib: 262144
      vars:
        shapes: "{{ {'gpt-oss-120b': shape.model} }}"
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    write_gguf(folder / "gpt-oss-120b.gguf", "gpt-oss-120b", "MXFP4", fill="sparse")
    (folder / "play.yml").write_text(PLAY)
    return folder


def run(folder, llamacpp):
    models = [
        {
            "name": "gpt-oss-120b",
            "engine": "llamacpp",
            "source": {"path": str(folder / "gpt-oss-120b.gguf")},
            "model_file": "gpt-oss-120b.gguf",
            "gpus": [0],
            "llamacpp": {"n_gpu_layers": 999, "parallel": 4, "ctx_size": 32768, **llamacpp},
        }
    ]
    extra = folder / "vars.json"
    extra.write_text(json.dumps({"model_path": str(folder / "gpt-oss-120b.gguf"), "cortex_models": models}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"@{extra}", str(folder / "play.yml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_a_model_too_large_for_its_gpu_fails_naming_what_would_fit_and_that_passes(setup):
    failed = run(setup, {})
    assert failed.returncode != 0
    assert "the models do not fit this host's GPUs" in failed.stdout
    assert "gpt-oss-120b would fit with any one of" in failed.stdout
    found = re.search(r"n_cpu_moe: (\d+)\}", failed.stdout)
    assert found, failed.stdout[-3000:]
    passed = run(setup, {"n_cpu_moe": int(found.group(1))})
    assert passed.returncode == 0, passed.stdout[-3000:]
    assert "failed=0" in passed.stdout
