# Shared by the scripts in this folder; source it, don't run it.
# shellcheck shell=bash
set -euo pipefail

CORTEX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CORTEX_CACHE_DIR="${CORTEX_CACHE_DIR:-$HOME/.cache/cortex-serving}"
CORTEX_VENV="${CORTEX_VENV:-$CORTEX_CACHE_DIR/venv}"
export CORTEX_ROOT CORTEX_CACHE_DIR CORTEX_VENV
export ANSIBLE_CONFIG="$CORTEX_ROOT/ansible.cfg"
# The machine's own Python, found without the virtualenv (which bootstrap may
# be about to replace), even when a caller already put it on PATH.
CORTEX_SYSTEM_PYTHON="${CORTEX_SYSTEM_PYTHON:-$(PATH="${PATH//"$CORTEX_VENV/bin:"/}" command -v python3)}"
export CORTEX_SYSTEM_PYTHON
export PATH="$CORTEX_VENV/bin:$PATH"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The median of a space-separated list of numbers (the benchmarks' runs).
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
