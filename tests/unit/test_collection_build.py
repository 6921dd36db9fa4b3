"""The built collection carries no credential and no cache: `ansible-galaxy
collection build` run on a copy of the tree that holds what a deployment and
a test run leave behind (generated keys under every inventory's .credentials,
tool caches), and the artifact listed."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A fresh marker each run: the artifact ships this very file, which must not hold it.
SECRET = f"marker-{secrets.token_hex(16)}"
# What ./scripts/up, the tests and the tools leave in a checkout.
LEFT_BEHIND = [
    "inventories/local/.credentials/gateway-api-key/default",
    "inventories/local/.credentials/gateway-admin-key/admin",
    "inventories/local/.credentials/engine-api-key/cortex-local",
    "inventories/example/.credentials/engine-api-key/gpu1",
    ".credentials/stray-key",
    ".ansible/collections/ansible_collections/x/key",
    ".hypothesis/examples/x",
    ".ruff_cache/0.17.6/x",
    ".pytest_cache/v/cache/nodeids",
    "gateway/src/cortex_gateway/__pycache__/app.cpython-311.pyc",
    "tests/unit/.hypothesis/examples/y",
    ".cache/collections/x",
    # Virtualenvs and packaging output, at the top and deeper (gateway/.venv
    # is where a contributor's editor or `uv` puts the gateway's own).
    ".venv/bin/activate",
    "gateway/.venv/bin/activate",
    "gateway/.venv/lib/python3.11/site-packages/x.py",
    "venv/bin/activate",
    "gateway/venv/pyvenv.cfg",
    "gateway/src/cortex_gateway.egg-info/PKG-INFO",
    "gateway/build/lib/cortex_gateway/app.py",
    ".tox/py311/x",
    "gateway/.mypy_cache/3.11/x.json",
    "gateway/.coverage",
    # What the GPU benchmarks carry (tests/bench/gpu).
    ".whl/gguf-0.19.0-py3-none-any.whl",
    ".lcsrc/README",
]
FORBIDDEN_PARTS = {
    ".credentials", ".ansible", ".hypothesis", ".ruff_cache", ".pytest_cache", "__pycache__", ".cache",
    ".venv", "venv", "cortex_gateway.egg-info", "build", ".tox", ".mypy_cache", ".coverage", ".whl", ".lcsrc",
}  # fmt: skip


def tracked_tree(destination: Path) -> Path:
    files = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def test_the_artifact_holds_no_credentials_and_no_caches(tmp_path):
    tree = tracked_tree(tmp_path / "tree")
    for name in LEFT_BEHIND:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(SECRET)
    galaxy = Path(sys.executable).with_name("ansible-galaxy")
    subprocess.run(
        [str(galaxy), "collection", "build", "--output-path", str(tmp_path / "out"), str(tree)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    artifact = next((tmp_path / "out").glob("cortex-serving-*.tar.gz"))
    with tarfile.open(artifact) as archive:
        members = archive.getmembers()
        leaked = [m.name for m in members if FORBIDDEN_PARTS & set(Path(m.name).parts)]
        carrying = [
            m.name
            for m in members
            if m.isfile() and SECRET.encode() in archive.extractfile(m).read()  # type: ignore[union-attr]
        ]
    assert leaked == []
    assert carrying == []
    # The build still holds the collection itself.
    names = {m.name for m in members}
    assert {"MANIFEST.json", "roles/model_servers/tasks/main.yml", "plugins/modules/model_plan.py"} <= names
