#!/usr/bin/env bash
# Build stand-in .debs of the NVIDIA Container Toolkit's four packages (same
# names, versions and dependencies as NVIDIA's), for test hosts that cannot
# reach NVIDIA's repository. See nvidia-ctk in this folder for what they do.
#   build-debs.sh VERSION OUT_DIR
set -euo pipefail
version="$1" out="$2"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
rm -f "$out"/*.deb

package() {  # name depends programs (files of this folder, to /usr/bin)...
  local name="$1" depends="$2"; shift 2
  local root="$work/$name"
  mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/doc/$name"
  printf 'Stand-in for the NVIDIA Container Toolkit package %s, for test hosts.\n' "$name" \
    > "$root/usr/share/doc/$name/README.stand-in"
  {
    echo "Package: $name"
    echo "Version: $version-1"
    echo "Architecture: all"
    echo "Maintainer: cortex.serving tests <tests@cortex.invalid>"
    [[ -n "$depends" ]] && echo "Depends: $depends"
    echo "Description: stand-in for NVIDIA's $name (tests only)"
  } > "$root/DEBIAN/control"
  for file in "$@"; do
    sed "s/@VERSION@/$version/" "$here/$file" > "$root/usr/bin/$file"
    chmod 0755 "$root/usr/bin/$file"
  done
}

build() {  # name
  local name="$1" root="$work/$1"
  # Same bytes on every build: the hosts' copies change only when the version does.
  find "$root" -exec touch -h -d @1700000000 {} +
  SOURCE_DATE_EPOCH=1700000000 dpkg-deb --root-owner-group --build "$root" "$out/${name}_${version}-1_all.deb" >/dev/null
}

package libnvidia-container1 "" && build libnvidia-container1
package libnvidia-container-tools "libnvidia-container1 (= $version-1)" && build libnvidia-container-tools
package nvidia-container-toolkit-base "" nvidia-container-runtime
# nvidia-ctk: the Python stand-in, run by the host's python3.
base="$work/nvidia-container-toolkit-base"
mkdir -p "$base/usr/lib/nvidia-ctk-stand-in"
sed "s/@VERSION@/$version/" "$here/nvidia_ctk.py" > "$base/usr/lib/nvidia-ctk-stand-in/nvidia_ctk.py"
printf '#!/bin/sh\nexec python3 /usr/lib/nvidia-ctk-stand-in/nvidia_ctk.py "$@"\n' > "$base/usr/bin/nvidia-ctk"
chmod 0755 "$base/usr/bin/nvidia-ctk"
build nvidia-container-toolkit-base
package nvidia-container-toolkit \
  "nvidia-container-toolkit-base (= $version-1), libnvidia-container-tools (= $version-1)"
build nvidia-container-toolkit
ls "$out"
