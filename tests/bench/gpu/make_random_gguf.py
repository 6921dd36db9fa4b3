"""Write a random-weight GGUF with the exact shape of a real model.

The weights are random, but every tensor, every shape and every metadata key
that llama.cpp reads is the real model's, so load time, memory and speed are
those of the real model. The shapes and the writer are tests/gguf_shapes.py.

    python make_random_gguf.py llama3-8b Q8_0 /data/llama3-8b-q8_0.gguf
    python make_random_gguf.py gpt-oss-120b MXFP4 /data/gpt-oss-120b.gguf --fill sparse-experts
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.gguf_shapes import main

if __name__ == "__main__":
    main()
