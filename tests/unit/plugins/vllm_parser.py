"""An argparse parser rebuilt from the pinned vLLM's `vllm serve` option table.

tests/fixtures/vllm/generate.sh writes the table from vLLM itself; parsing a
rendered command line with this parser fails on an unknown flag, a value of
the wrong type, or a value outside vLLM's choices, as `vllm serve` would.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "vllm" / "serve-options-0.33.0.json"
_HUMAN_INT = re.compile(r"^-?\d+(\.\d+)?[kKmMgGtT]?$|^auto$")


class ParseError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of exiting
        raise ParseError(message)


def _human_int(text: str) -> str:
    if not _HUMAN_INT.match(text):
        raise argparse.ArgumentTypeError(f"not a human-readable integer: {text!r}")
    return text


TYPES = {"int": int, "float": float, "str": str, "json": str, "bool": str, "int_like": _human_int}


def table() -> dict:
    return json.loads(FIXTURE.read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vllm serve", add_help=False, allow_abbrev=False)
    parser.add_argument("model_tag", nargs="?")
    for option in table()["options"]:
        kind = option["type"]
        if kind == "bool_optional":
            parser.add_argument(*option["flags"], dest=option["dest"], action="store_const", const=True)
            continue
        if kind == "flag":
            parser.add_argument(*option["flags"], dest=option["dest"], action="store_true")
            continue
        kwargs = {"dest": option["dest"], "type": TYPES[kind]}
        if option["nargs"] is not None:
            kwargs["nargs"] = option["nargs"]
        if option["choices"]:
            kwargs["choices"] = [TYPES[kind](c) if kind in ("int", "float") else c for c in option["choices"]]
        parser.add_argument(*option["flags"], **kwargs)
    return parser


def parse(args: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(args)
