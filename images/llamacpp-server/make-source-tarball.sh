#!/usr/bin/env bash
# Make a llama.cpp source tarball without reaching GitHub: the PyPI sdist of
# llama-cpp-python carries a recent llama.cpp under vendor/llama.cpp. Tests and
# air-gapped sites hand this tarball to the image build; online sites use the
# pinned upstream release tarball instead.
#
# Usage: make-source-tarball.sh OUTPUT_DIR
# Prints the tarball's path. Re-running with the tarball present does nothing.
#
# Environment:
#   CORTEX_LLAMACPP_SDIST_VERSION  llama-cpp-python version (default 0.3.36)
#   CORTEX_LLAMACPP_VERSION        llama.cpp version it vendors (default 0c1e570,
#                                  the upstream commit named in its changelog)
#   PIP                            pip to download with (default: python3 -m pip)
set -euo pipefail

out_dir="${1:?usage: make-source-tarball.sh OUTPUT_DIR}"
sdist_version="${CORTEX_LLAMACPP_SDIST_VERSION:-0.3.36}"
version="${CORTEX_LLAMACPP_VERSION:-0c1e570}"
tarball="$out_dir/llama.cpp-$version.tar.gz"

log() { printf '[llama.cpp source] %s\n' "$*" >&2; }

if [[ -s "$tarball" ]]; then
  log "present: $tarball"
  printf '%s\n' "$tarball"
  exit 0
fi
mkdir -p "$out_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

sdist="$out_dir/llama_cpp_python-$sdist_version.tar.gz"
if [[ ! -s "$sdist" ]]; then
  log "downloading the llama-cpp-python $sdist_version sdist"
  # pip prepares an sdist's metadata before it saves it, and this one's build
  # backend (scikit-build-core) wants CMake for that; give it prebuilt wheels of
  # both in a throwaway environment rather than letting pip compile CMake.
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install --quiet --disable-pip-version-check scikit-build-core cmake ninja
  "$work/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    --no-binary :all: --no-build-isolation -d "$work/dl" "llama-cpp-python==$sdist_version"
  mv "$work/dl/llama_cpp_python-$sdist_version.tar.gz" "$sdist"
fi

log "extracting vendor/llama.cpp"
tar -xzf "$sdist" -C "$work" "llama_cpp_python-$sdist_version/vendor/llama.cpp"
src="$work/llama_cpp_python-$sdist_version/vendor/llama.cpp"
# The build needs none of the vocab test files, docs or media (about 110 MB).
rm -rf "$src/models" "$src/docs" "$src/media"
# A fixed mtime and owner, so the same sdist gives the same tarball, and the
# same tarball gives Docker's build cache the same layer.
tar --sort=name --mtime='2020-01-01 00:00:00Z' --owner=0 --group=0 --numeric-owner \
  -C "$work/llama_cpp_python-$sdist_version/vendor" -cf - llama.cpp \
  | gzip -n -6 > "$tarball.tmp"
mv "$tarball.tmp" "$tarball"
log "wrote $tarball ($(du -h "$tarball" | cut -f1), sha256 $(sha256sum "$tarball" | cut -c1-16)…)"
printf '%s\n' "$tarball"
