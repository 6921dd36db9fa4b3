#!/usr/bin/env bash
# Ansible's pipelining over `docker exec` (how the Molecule scenarios and the
# local host are reached), side by side in one run: 20 module tasks with
# become against a throwaway cortex/host:debian12 container, without and with
# pipelining, alternated ROUNDS times. Prints each run and the ratio of the
# medians. Needs scripts/bootstrap's virtualenv and platform images.
#
#   tests/bench/ansible/pipelining.sh [ROUNDS]
source "$(dirname "$0")/../../../scripts/lib.sh"
rounds="${1:-3}"
work="$(mktemp -d)"
name="cortex-bench-pipelining-$$"
trap 'docker rm -f "$name" >/dev/null 2>&1; rm -rf "$work"' EXIT
docker run -d --rm --name "$name" --entrypoint sleep cortex/host:debian12 infinity >/dev/null
printf '[defaults]\n' >"$work/ansible.cfg"
cat >"$work/play.yml" <<YAML
- hosts: all
  gather_facts: false
  become: true
  tasks:
    - name: Stat a file, 20 times
      ansible.builtin.stat:
        path: /etc/hostname
      loop: "{{ range(20) | list }}"
YAML
declare -A runs=([False]="" [True]="")
for _ in $(seq "$rounds"); do
  for pipelining in False True; do
    start=$(date +%s%N)
    ANSIBLE_PIPELINING=$pipelining ANSIBLE_CONFIG="$work/ansible.cfg" ANSIBLE_PYTHON_INTERPRETER=/usr/bin/python3 \
      ansible-playbook -i "$name," -c community.docker.docker "$work/play.yml" >/dev/null 2>&1
    seconds=$(python3 -c "print(($(date +%s%N) - $start) / 1e9)")
    runs[$pipelining]+="$seconds "
    printf 'pipelining=%-5s %6.2f s\n' "$pipelining" "$seconds"
  done
done
off=$(median "${runs[False]}") on=$(median "${runs[True]}")
printf 'median without %.2f s, with %.2f s: pipelining takes %.2fx the time\n' "$off" "$on" "$(python3 -c "print($on / $off)")"
