# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""GGUF metadata, read with the ``gguf`` package (passed in, for tests).

A split model (``name-00001-of-00003.gguf``) is read as one: every part must
be present, and tensors are counted across all of them.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re

GGUF_MAGIC = b"GGUF"
_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFInfoError(Exception):
    """The file is missing, not GGUF, or a split set is incomplete."""


def split_parts(path):
    """Every file of the model that ``path`` belongs to, in order."""
    match = _SPLIT_NAME.match(os.path.basename(path))
    if not match:
        return [path]
    count = int(match.group("count"))
    folder = os.path.dirname(path)
    parts = [
        os.path.join(folder, "%s-%05d-of-%05d.gguf" % (match.group("stem"), number, count))
        for number in range(1, count + 1)
    ]
    missing = [p for p in parts if not os.path.exists(p)]
    if missing:
        raise GGUFInfoError(
            "%s is part of a %d-file split model, but %s %s missing"
            % (
                path,
                count,
                ", ".join(os.path.basename(p) for p in missing),
                "is" if len(missing) == 1 else "are",
            )
        )
    return parts


def check_magic(path):
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except (IOError, OSError) as exc:
        raise GGUFInfoError("cannot read %s: %s" % (path, exc.strerror or exc)) from exc
    if magic != GGUF_MAGIC:
        raise GGUFInfoError("%s is not a GGUF file (it starts with %r, not %r)" % (path, magic, GGUF_MAGIC))


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def quantization_name(gguf, file_type):
    """llama.cpp's name of a general.file_type (3 -> 'Q4_1')."""
    if file_type is None:
        return None
    try:
        name = gguf.LlamaFileType(int(file_type)).name
    except ValueError:
        return "unknown (%s)" % file_type
    return name[len("MOSTLY_") :] if name.startswith("MOSTLY_") else name


def read_gguf_info(path, gguf):
    """Architecture, size and attention shape of the model at ``path``."""
    parts = split_parts(path)
    for part in parts:
        check_magic(part)
    readers = [gguf.GGUFReader(part) for part in parts]
    first = readers[0]
    arch = _field(first, "general.architecture")
    if not arch:
        raise GGUFInfoError("%s has no general.architecture key" % path)

    def arch_field(key):
        return _field(first, "%s.%s" % (arch, key))

    file_type = _field(first, "general.file_type")
    tensors = [t for r in readers for t in r.tensors]
    names = set(t.name for t in tensors)
    token_embd_bytes = sum(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")
    output_bytes = sum(int(t.n_bytes) for t in tensors if t.name == "output.weight")
    head_count = arch_field("attention.head_count")
    embedding = arch_field("embedding_length")
    return {
        "path": path,
        "files": parts,
        "split_count": len(parts),
        "size_bytes": sum(os.path.getsize(p) for p in parts),
        "architecture": arch,
        "name": _field(first, "general.name"),
        "file_type": file_type,
        "quantization": quantization_name(gguf, file_type),
        "parameter_count": sum(int(t.n_elements) for t in tensors),
        "tensor_bytes": sum(int(t.n_bytes) for t in tensors),
        # llama.cpp keeps the input embedding in host memory; a model without
        # its own output matrix reuses (and copies to the GPU) the embedding.
        "token_embd_bytes": token_embd_bytes,
        "tied_output": "output.weight" not in names,
        "output_bytes": output_bytes if "output.weight" in names else token_embd_bytes,
        "context_length": arch_field("context_length"),
        "block_count": arch_field("block_count"),
        "embedding_length": embedding,
        "feed_forward_length": arch_field("feed_forward_length"),
        "head_count": head_count,
        # Without the key, a model has as many KV heads as heads (no GQA).
        "head_count_kv": arch_field("attention.head_count_kv") or head_count,
        "key_length": arch_field("attention.key_length")
        or (embedding // head_count if embedding and head_count else None),
        "value_length": arch_field("attention.value_length")
        or (embedding // head_count if embedding and head_count else None),
        "vocab_size": arch_field("vocab_size"),
    }
