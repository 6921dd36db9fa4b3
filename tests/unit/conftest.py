"""Fixtures shared by the unit tests of the collection's plugins and inventories."""

from __future__ import annotations

import gguf
import pytest
from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import read_gguf_info

from tests.gguf_shapes import write_gguf


@pytest.fixture(scope="session")
def gpt_oss_120b(tmp_path_factory) -> dict:
    """What gguf_info reads from the published gpt-oss-120b file's shape (a sparse file: no disk).

    Read once: GGUFReader takes seconds over a 201,088-token vocabulary.
    """
    path = tmp_path_factory.mktemp("gguf") / "gpt-oss-120b-mxfp4.gguf"
    write_gguf(path, "gpt-oss-120b", "MXFP4", fill="sparse")
    return read_gguf_info(str(path), gguf)
