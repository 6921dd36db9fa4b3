#!/usr/bin/env bash
# Build llama-server (and llama-bench) from a llama.cpp source tree or tarball.
# The one build script: the Dockerfile runs it, and so do native builds on a GPU
# machine, so a measured build is the build that ships.
#
# Usage: build-llama-server.sh --source DIR|TARBALL --prefix DIR
#          [--backend cpu|cuda] [--cuda-architectures "89;90"|default]
#          [--version V] [--jobs N] [--build-dir DIR]
# --cuda-architectures default leaves llama.cpp's own list of architectures.
set -euo pipefail

source_arg="" prefix="" backend="cpu" cuda_archs="89" version="unknown"
jobs="$(nproc)" build_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --source) source_arg="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --backend) backend="$2"; shift 2 ;;
    --cuda-architectures) cuda_archs="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    *) echo "build-llama-server.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ -n "$source_arg" && -n "$prefix" ]] || { echo "build-llama-server.sh: --source and --prefix are required" >&2; exit 2; }
case "$backend" in cpu|cuda) ;; *) echo "build-llama-server.sh: --backend must be cpu or cuda, not '$backend'" >&2; exit 2 ;; esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [[ -f "$source_arg" ]]; then
  tar -xzf "$source_arg" -C "$work"
  src="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)"
else
  src="$source_arg"
fi
[[ -f "$src/CMakeLists.txt" && -d "$src/tools/server" ]] || { echo "build-llama-server.sh: $source_arg is not a llama.cpp source tree (no tools/server)" >&2; exit 2; }
build_dir="${build_dir:-$work/build}"

cmake_args=(
  -S "$src" -B "$build_dir" -G Ninja
  -DCMAKE_BUILD_TYPE=Release
  # Static llama/ggml libraries: two self-contained programs to ship.
  -DBUILD_SHARED_LIBS=OFF
  # Portable binaries (AVX2/FMA baseline, not this build machine's CPU): the
  # image runs on whatever CPUs the fleet has.
  -DGGML_NATIVE=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_COMMIT="$version" -DLLAMA_BUILD_NUMBER=0
)
if [[ "$backend" == cuda ]]; then
  cmake_args+=(-DGGML_CUDA=ON)
  [[ "$cuda_archs" == default ]] || cmake_args+=(-DCMAKE_CUDA_ARCHITECTURES="$cuda_archs")
fi

target="$backend"
[[ "$backend" == cuda ]] && target="cuda, architectures $cuda_archs"
echo "[build] llama.cpp $version, backend $target, $jobs jobs" >&2
start=$(date +%s)
cmake "${cmake_args[@]}" >"$work/configure.log" 2>&1 || { cat "$work/configure.log" >&2; exit 1; }
cmake --build "$build_dir" --config Release -j "$jobs" --target llama-server llama-bench
# Install exactly what is served, nothing of the rest of the tree.
install -d "$prefix/bin"
install -m 0755 "$build_dir/bin/llama-server" "$build_dir/bin/llama-bench" "$prefix/bin/"
echo "[build] done in $(( $(date +%s) - start )) s" >&2
