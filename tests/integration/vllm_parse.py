"""Parse `vllm serve` command lines with the installed vLLM's own parser.

Run with the vLLM virtualenv's Python inside the CPU runtime image (the
integration tests mount it). Reads a JSON list of argument lists (what follows
`vllm serve`) on stdin and prints, as JSON, vLLM's version, every flag its
serve parser knows, and for each line either the parsed options (dest ->
value, as strings) or vLLM's own error message.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import vllm
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser


def main() -> None:
    lines = json.load(sys.stdin)
    top = FlexibleArgumentParser(prog="vllm")
    subcommand = ServeSubcommand()
    serve = subcommand.subparser_init(top.add_subparsers(dest="subparser"))
    flags = sorted(flag for action in serve._actions for flag in action.option_strings)
    results = []
    for args in lines:
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                parsed = top.parse_args(["serve", *args])
                subcommand.validate(parsed)
        except (SystemExit, ValueError, TypeError) as exc:
            results.append({"error": said.getvalue().strip() or str(exc)})
            continue
        results.append(
            {"options": {k: str(v) for k, v in sorted(vars(parsed).items()) if k != "dispatch_function"}}
        )
    json.dump({"version": vllm.__version__, "flags": flags, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
