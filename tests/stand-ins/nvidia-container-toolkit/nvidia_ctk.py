"""A stand-in for NVIDIA's nvidia-ctk, for test hosts without NVIDIA's repository.

NVIDIA's container toolkit is published only in NVIDIA's own package
repository, which these test machines cannot reach, and Debian does not
package it. This stand-in does what the nvidia_container_toolkit role asks of
the real tool, the way the real tool does it (nvidia-ctk 1.17's
`runtime configure` for Docker: load daemon.json, set runtimes.nvidia and
optionally default-runtime, keep every other key, write it indented by four
spaces, or print it with --dry-run), so the role's probe, its merge and its
idempotence run for real. It cannot generate a CDI spec: there is no driver.
The package's /usr/bin/nvidia-ctk runs this file with the host's python3.
"""

import argparse
import json
import os
import sys

VERSION = "@VERSION@"


def configure(args):
    if args.runtime != "docker":
        sys.exit("nvidia-ctk (stand-in): only --runtime=docker is supported")
    try:
        with open(args.config, encoding="utf-8") as handle:
            text = handle.read()
        config = json.loads(text) if text.strip() else {}
    except FileNotFoundError:
        config = {}
    runtimes = config.setdefault("runtimes", {})
    runtimes[args.nvidia_runtime_name] = {"args": [], "path": args.nvidia_runtime_path}
    if args.set_as_default:
        config["default-runtime"] = args.nvidia_runtime_name
    output = json.dumps(config, indent=4, sort_keys=True)
    if args.dry_run:
        print(output)
        return
    os.makedirs(os.path.dirname(args.config), exist_ok=True)
    with open(args.config, "w", encoding="utf-8") as handle:
        handle.write(output)
    print(f"INFO[0000] Wrote updated config to {args.config}", file=sys.stderr)
    print("INFO[0000] It is recommended that docker daemon be restarted.", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(prog="nvidia-ctk")
    version = f"NVIDIA Container Toolkit CLI version {VERSION} (stand-in)"
    parser.add_argument("--version", action="version", version=version)
    commands = parser.add_subparsers(dest="command", required=True)
    runtime = commands.add_parser("runtime").add_subparsers(dest="action", required=True)
    conf = runtime.add_parser("configure")
    conf.add_argument("--runtime", default="docker")
    conf.add_argument("--config", default="/etc/docker/daemon.json")
    conf.add_argument("--dry-run", action="store_true")
    conf.add_argument("--set-as-default", action="store_true")
    conf.add_argument("--nvidia-runtime-name", default="nvidia")
    conf.add_argument("--nvidia-runtime-path", default="nvidia-container-runtime")
    cdi = commands.add_parser("cdi").add_subparsers(dest="action", required=True)
    generate = cdi.add_parser("generate")
    generate.add_argument("--output")
    args = parser.parse_args()
    if args.command == "runtime":
        configure(args)
    else:
        sys.exit("nvidia-ctk (stand-in): no NVIDIA driver here, no CDI spec to generate")


if __name__ == "__main__":
    main()
