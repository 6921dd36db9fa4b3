"""Command line: serve, check a config, hash a key."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from .app import Gateway
from .auth import hash_key
from .config import ConfigError, load_config

DEFAULT_CONFIG = "/etc/cortex-gateway/config.yml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cortex-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=DEFAULT_CONFIG)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", default=DEFAULT_CONFIG)
    commands.add_parser("hash-key", help="read an API key on stdin, print its sha256")
    args = parser.parse_args(argv)

    if args.command == "hash-key":
        key = sys.stdin.readline().strip()
        if not key:
            print("cortex-gateway: no key on stdin", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cortex-gateway: invalid config: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.config}: ok, {len(config.models)} model(s)")
        return 0

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGHUP re-reads the config file without dropping requests in flight.
    gateway = Gateway(config, config_path=args.config)
    web.run_app(
        gateway.build_app(),
        host=config.host,
        port=config.port,
        access_log=None,
        # On SIGTERM, in-flight requests get this long to finish.
        shutdown_timeout=30,
        print=lambda *_: None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
