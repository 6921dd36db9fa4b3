"""Command line: serve, check a config, hash a key, report usage."""

from __future__ import annotations

import argparse
import logging
import sys

from . import workers
from .auth import hash_key
from .config import ConfigError, load_config, restart_key
from .usage import day_start, store_for, to_csv

DEFAULT_CONFIG = "/etc/cortex-gateway/config.yml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cortex-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=DEFAULT_CONFIG)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", default=DEFAULT_CONFIG)
    key = commands.add_parser(
        "restart-key", help="print the digest of a config's settings that only a restart applies"
    )
    key.add_argument("--config", default=DEFAULT_CONFIG)
    commands.add_parser("hash-key", help="read an API key on stdin, print its sha256")
    usage = commands.add_parser("usage", help="report usage by key, model and day")
    usage.add_argument("--config", default=DEFAULT_CONFIG, help="take the database from this config")
    usage.add_argument("--db", help="a SQLite usage database (instead of the config's)")
    usage.add_argument("--dsn", help="a PostgreSQL usage database (instead of the config's)")
    usage.add_argument("--group-by", default="key,model,day", help="any of key, model, day, comma-separated")
    usage.add_argument("--since", help="first day, YYYY-MM-DD (UTC)")
    usage.add_argument("--csv", action="store_true", help="CSV instead of a table")
    args = parser.parse_args(argv)

    if args.command == "usage":
        return _usage(args)

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
    if args.command == "restart-key":
        print(restart_key(config))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGHUP re-reads the config file without dropping requests in flight;
    # SIGTERM drains them, then writes the usage records.
    return workers.serve(config, args.config)


def _usage(args: argparse.Namespace) -> int:
    store = store_for(args.db, args.dsn)
    if store is None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"cortex-gateway: invalid config: {exc}", file=sys.stderr)
            return 2
        store = store_for(config.usage_path, config.usage_postgres_dsn)
        if store is None:
            print(f"cortex-gateway: {args.config} keeps no usage records (usage)", file=sys.stderr)
            return 2
    try:
        since = day_start(args.since)
        rows = store.report([g for g in args.group_by.split(",") if g], since)
    except Exception as exc:  # noqa: BLE001 - any database error becomes one line, not a traceback
        print(f"cortex-gateway: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        sys.stdout.write(to_csv(rows))
        return 0
    if rows:
        columns = list(rows[0])
        widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for row in rows:
            print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
