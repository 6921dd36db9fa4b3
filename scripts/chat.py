"""Send one chat completion through the gateway with the official openai client."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import openai


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key-file", type=Path, required=True)
    parser.add_argument("--model", help="default: the first model the gateway lists")
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()

    client = openai.OpenAI(
        base_url=args.base_url, api_key=args.api_key_file.read_text().strip(), timeout=120, max_retries=2
    )
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": args.prompt}]
    print(f"model: {model}\nprompt: {args.prompt}\nanswer: ", end="", flush=True)
    if args.stream:
        for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=64, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    else:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=64, temperature=0)
        print(reply.choices[0].message.content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
