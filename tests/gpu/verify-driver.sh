#!/usr/bin/env bash
# Run tests/gpu/verify_driver.yml on this (GPU) machine with no network:
# Ansible from the wheels in .whl/py<version>/ (fetched beforehand with pip
# download), this checkout as the cortex.serving collection.
set -euo pipefail
cd "$(dirname "$0")/../.."
py="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
work="$(mktemp -d)"
python3 -m venv "$work/venv"
# The machine's nvidia-ml-py (gpu_facts needs it; a single module), wherever python3 finds it.
ln -s "$(python3 -c 'import pynvml; print(pynvml.__file__)')" "$work/venv/lib/python$py/site-packages/"
"$work/venv/bin/pip" install -q --no-index --find-links ".whl/py$py" ansible-core
mkdir -p "$work/collections/ansible_collections/cortex"
printf "[defaults]\n" > "$work/ansible.cfg"  # not the checkout's: its callbacks need collections not here
ln -s "$PWD" "$work/collections/ansible_collections/cortex/serving"
ANSIBLE_COLLECTIONS_PATH="$work/collections" ANSIBLE_FORCE_COLOR=0 ANSIBLE_CONFIG="$work/ansible.cfg" ANSIBLE_LOCALHOST_WARNING=0 \
  "$work/venv/bin/ansible-playbook" -i localhost, \
  -e "ansible_python_interpreter=$work/venv/bin/python" tests/gpu/verify_driver.yml
