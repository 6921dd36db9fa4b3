"""The nvidia_driver role's policies, run for real on this machine (no NVIDIA GPU here):
a host without a GPU is refused when so configured, and Secure Boot stops DKMS modules.

Secure Boot's state comes from `mokutil --sb-state`; there is no UEFI firmware
here, so a stand-in mokutil on PATH answers as a firmware would. That stand-in
is the only thing not real in these tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

PLAYBOOK = Path(__file__).parent / "playbooks" / "nvidia_driver_policies.yml"


def run(tmp_path: Path, *extra: str, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", str(PLAYBOOK),
         "-e", f"ansible_python_interpreter={sys.executable}", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def fake_mokutil(tmp_path: Path, state: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    tool = folder / "mokutil"
    tool.write_text(f"#!/bin/sh\necho 'SecureBoot {state}'\n")
    tool.chmod(0o755)
    return folder


def test_a_host_without_a_gpu_is_refused_when_the_policy_says_fail(tmp_path):
    result = run(tmp_path, "-e", "policy_case=no_gpu", "-e", "nvidia_driver_no_gpu=fail")
    assert result.returncode != 0
    assert "has no NVIDIA GPU on its PCI bus and nvidia_driver_no_gpu is fail" in result.stdout
    # It stopped before the first package task.
    assert "Install and hold the driver" not in result.stdout


def test_secure_boot_stops_dkms_modules_with_what_to_do(tmp_path):
    result = run(tmp_path, "-e", "policy_case=secure_boot", path_prefix=fake_mokutil(tmp_path, "enabled"))
    assert result.returncode != 0
    assert "boots with Secure Boot on, and DKMS-built NVIDIA modules are signed" in result.stdout
    assert "nvidia_driver_secure_boot: mok" in result.stdout


def test_secure_boot_with_mok_prints_the_enrollment_steps(tmp_path):
    result = run(tmp_path, "-e", "policy_case=secure_boot", "-e", "nvidia_driver_secure_boot=mok",
                 path_prefix=fake_mokutil(tmp_path, "enabled"))  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert "mokutil --import /var/lib/dkms/mok.pub" in result.stdout


def test_secure_boot_off_passes_quietly(tmp_path):
    result = run(tmp_path, "-e", "policy_case=secure_boot", path_prefix=fake_mokutil(tmp_path, "disabled"))
    assert result.returncode == 0, result.stdout
    assert "mokutil --import" not in result.stdout
