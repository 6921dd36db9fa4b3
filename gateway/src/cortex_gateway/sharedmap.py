"""Files that the worker processes of one gateway map into memory together:
the per-key limits table (limits.py) and the prefix-affinity index (affinity.py)."""

from __future__ import annotations

import mmap
import os
import tempfile


def map_file(
    path: str | None, size: int, private_prefix: str, *, clear_if_resized: bool = False
) -> tuple[int, str, mmap.mmap]:
    """The file at ``path`` (created if missing), at least ``size`` bytes,
    mapped MAP_SHARED: its descriptor, its path and the mapping. Without a
    path, a private file of this process, gone when closed. With
    ``clear_if_resized``, a file of another size is emptied first (what it
    held was laid out for that size)."""
    if path is None:
        fd, path = tempfile.mkstemp(prefix=private_prefix)
        os.unlink(path)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    current = os.fstat(fd).st_size
    if clear_if_resized and current not in (0, size):
        os.ftruncate(fd, 0)
        current = 0
    if current < size:
        os.ftruncate(fd, size)
    return fd, path, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
