#!/usr/bin/env bash
# Build the local test platforms from Debian's packages, with no registry:
#   cortex/debian:12       a minimal bookworm rootfs (mmdebstrap | docker import)
#   cortex/host:debian12   that rootfs plus systemd, python3 and sudo: a "host"
#                          that Molecule and the local inventory boot with /sbin/init
# Each image carries the hash of its inputs as a label and is rebuilt only when
# that hash changes, so repeated runs cost a second.
#
# Environment:
#   CORTEX_DEBIAN_MIRROR  Debian mirror to bootstrap from (default: the first
#                         Debian URI this machine's apt sources use)
#   CORTEX_PLATFORM_FORCE=1  rebuild even when the inputs are unchanged
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
suite="bookworm"
base_tag="cortex/debian:12"
host_tag="cortex/host:debian12"
label="io.cortex.inputs"

log() { printf '[platforms] %s\n' "$*" >&2; }

debian_mirror() {
  if [[ -n "${CORTEX_DEBIAN_MIRROR:-}" ]]; then
    printf '%s\n' "$CORTEX_DEBIAN_MIRROR"
    return
  fi
  # deb822 sources first, then the one-line format.
  local uri
  uri="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)"
  if [[ -z "$uri" ]]; then
    uri="$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)"
  fi
  if [[ -z "$uri" ]]; then
    log "no Debian mirror found in /etc/apt; set CORTEX_DEBIAN_MIRROR"
    exit 2
  fi
  printf '%s\n' "$uri"
}

current_label() {
  docker image inspect --format "{{ index .Config.Labels \"$label\" }}" "$1" 2>/dev/null || true
}

mirror="$(debian_mirror)"
base_packages="ca-certificates"

base_inputs="$( { echo "$suite $mirror $base_packages"; sed -n '/^# base:begin/,/^# base:end/p' "$0"; } | sha256sum | cut -c1-16)"
if [[ "${CORTEX_PLATFORM_FORCE:-0}" != 1 && "$(current_label "$base_tag")" == "$base_inputs" ]]; then
  log "$base_tag is up to date ($base_inputs)"
else
  command -v mmdebstrap >/dev/null || { log "mmdebstrap is missing: apt-get install mmdebstrap"; exit 2; }
  log "bootstrapping Debian $suite from $mirror into $base_tag (about a minute)"
  # base:begin
  mmdebstrap --quiet --variant=minbase --include="$base_packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$suite" - "$mirror" \
    | docker import \
        --change "LABEL $label=$base_inputs" \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$base_tag" >/dev/null
  # base:end
  log "built $base_tag"
fi

host_inputs="$( { echo "$base_inputs"; cat "$here/host/Dockerfile"; } | sha256sum | cut -c1-16)"
if [[ "${CORTEX_PLATFORM_FORCE:-0}" != 1 && "$(current_label "$host_tag")" == "$host_inputs" ]]; then
  log "$host_tag is up to date ($host_inputs)"
else
  log "building $host_tag"
  docker build --quiet --label "$label=$host_inputs" --build-arg "BASE_IMAGE=$base_tag" \
    -t "$host_tag" "$here/host" >/dev/null
  log "built $host_tag"
fi
