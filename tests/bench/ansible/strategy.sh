#!/usr/bin/env bash
# Ansible's linear strategy against Mitogen's (what ansible.cfg and the
# Molecule scenarios use), side by side in one run: 32 separate module tasks
# with become (stat, file, copy, command: the kinds a converge is made of)
# against a throwaway cortex/host:debian12 container reached through
# `docker exec`, pipelining on for both, alternated ROUNDS times. Prints each
# run and the ratio of the medians; every run must end with rc 0 and the same
# task count, or the benchmark fails. Needs scripts/bootstrap's virtualenv,
# its .cache/strategy_plugins link and the platform images.
#
#   tests/bench/ansible/strategy.sh [ROUNDS]
source "$(dirname "$0")/../../../scripts/lib.sh"
rounds="${1:-3}"
work="$(mktemp -d)"
name="cortex-bench-strategy-$$"
trap 'docker rm -f "$name" >/dev/null 2>&1; rm -rf "$work"' EXIT
docker run -d --rm --name "$name" --entrypoint sleep cortex/host:debian12 infinity >/dev/null
printf '[defaults]\nstrategy_plugins = %s\n' "$CORTEX_ROOT/.cache/strategy_plugins" >"$work/ansible.cfg"
{
  printf -- '- hosts: all\n  gather_facts: false\n  become: true\n  tasks:\n'
  for i in $(seq 8); do
    cat <<YAML
    - name: Stat a file ($i)
      ansible.builtin.stat:
        path: /etc/hostname
    - name: Make a folder ($i)
      ansible.builtin.file:
        path: /tmp/bench-$i
        state: directory
        mode: "0755"
    - name: Write a file ($i)
      ansible.builtin.copy:
        content: "run {{ 1000000 | random }}\n"
        dest: /tmp/bench-$i/file
        mode: "0644"
    - name: Run a command ($i)
      ansible.builtin.command: "true"
      changed_when: false
YAML
  done
} >"$work/play.yml"
declare -A runs=([linear]="" [mitogen_linear]="")
for _ in $(seq "$rounds"); do
  for strategy in linear mitogen_linear; do
    start=$(date +%s%N)
    ANSIBLE_STRATEGY=$strategy ANSIBLE_PIPELINING=True ANSIBLE_CONFIG="$work/ansible.cfg" \
      ANSIBLE_PYTHON_INTERPRETER=/usr/bin/python3 \
      ansible-playbook -i "$name," -c docker "$work/play.yml" >"$work/out" 2>&1 ||
      { cat "$work/out"; die "the $strategy run failed"; }
    grep -q "ok=32 " "$work/out" || { cat "$work/out"; die "the $strategy run did not run 32 tasks"; }
    seconds=$(python3 -c "print(($(date +%s%N) - $start) / 1e9)")
    runs[$strategy]+="$seconds "
    printf '%-15s %6.2f s\n' "$strategy" "$seconds"
  done
done
linear=$(median "${runs[linear]}") mitogen=$(median "${runs[mitogen_linear]}")
printf 'median linear %.2f s, mitogen_linear %.2f s: Mitogen takes %.2fx the time (%.2f s against %.2f s a task)\n' \
  "$linear" "$mitogen" "$(python3 -c "print($mitogen / $linear)")" \
  "$(python3 -c "print($mitogen / 32)")" "$(python3 -c "print($linear / 32)")"
