# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where a model's files come from: the kinds of ``source``, and the file names each gives.

Private to the collection.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

SOURCE_KINDS = ("wheel", "path", "url", "hf_repo")


def source_kind(source):
    """Which of the source kinds a ``source`` dict declares (or None)."""
    kinds = [kind for kind in SOURCE_KINDS if isinstance(source, dict) and source.get(kind)]
    return kinds[0] if len(kinds) == 1 else None


def source_file_name(source):
    """Base name of the model file a source gives (None for a repo directory)."""
    kind = source_kind(source)
    if kind == "wheel":
        name = source.get("member") or ""
    elif kind == "path":
        name = source.get("path") or ""
    elif kind == "url":
        name = source.get("filename") or str(source.get("url") or "").split("?", 1)[0].rstrip("/")
    elif kind == "hf_repo":
        name = source.get("file") or ""
    else:
        return None
    name = name.rsplit("/", 1)[-1]
    return name or None


_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def source_files(source):
    """Every file a source's model file consists of: the parts of a split GGUF, in order."""
    name = source_file_name(source)
    if not name:
        return []
    folder = ""
    if source_kind(source) == "hf_repo" and "/" in (source.get("file") or ""):
        folder = source["file"].rsplit("/", 1)[0] + "/"
    match = _SPLIT.match(name)
    if not match:
        return [folder + name]
    count = int(match.group("count"))
    return [folder + "%s-%05d-of-%05d.gguf" % (match.group("stem"), n, count) for n in range(1, count + 1)]
