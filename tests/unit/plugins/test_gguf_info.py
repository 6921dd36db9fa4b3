"""gguf_info on real GGUF files written with the gguf package."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import (
    GGUFInfoError,
    read_gguf_info,
)


def write_gguf(path: Path, tensors: dict[str, tuple[int, ...]], split: tuple[int, int] | None = None) -> None:
    """A tiny llama-shaped GGUF: 2 layers, 8 heads sharing 2 KV heads."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(4096)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    if split is not None:
        writer.add_uint16("split.no", split[0])
        writer.add_uint16("split.count", split[1])
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_single_file_metadata(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, {"token_embd.weight": (100, 64), "output.weight": (100, 64)})
    info = read_gguf_info(str(path), gguf)
    assert info["architecture"] == "llama"
    assert info["name"] == "tiny-llama"
    assert info["parameter_count"] == 2 * 100 * 64
    assert info["tensor_bytes"] == 2 * 100 * 64 * 2
    assert info["quantization"] == "F16"
    assert (info["context_length"], info["block_count"], info["embedding_length"]) == (4096, 2, 64)
    assert (info["head_count"], info["head_count_kv"], info["key_length"]) == (8, 2, 8)
    assert info["split_count"] == 1
    assert info["size_bytes"] == path.stat().st_size


def test_split_model_is_read_as_one(tmp_path):
    for number in (1, 2, 3):
        write_gguf(
            tmp_path / f"tiny-{number:05d}-of-00003.gguf",
            {f"blk.{number}.w": (10, 64)},
            split=(number - 1, 3),
        )
    info = read_gguf_info(str(tmp_path / "tiny-00002-of-00003.gguf"), gguf)
    assert info["split_count"] == 3
    assert [Path(f).name for f in info["files"]] == [f"tiny-{n:05d}-of-00003.gguf" for n in (1, 2, 3)]
    assert info["parameter_count"] == 3 * 10 * 64


def test_missing_split_part_is_named(tmp_path):
    write_gguf(tmp_path / "tiny-00001-of-00002.gguf", {"a": (4, 4)}, split=(0, 2))
    with pytest.raises(GGUFInfoError, match=r"2-file split model, but tiny-00002-of-00002\.gguf is missing"):
        read_gguf_info(str(tmp_path / "tiny-00001-of-00002.gguf"), gguf)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(GGUFInfoError, match="is not a GGUF file"):
        read_gguf_info(str(path), gguf)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(GGUFInfoError, match=r"cannot read .*nothing\.gguf"):
        read_gguf_info(str(tmp_path / "nothing.gguf"), gguf)
