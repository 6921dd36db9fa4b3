"""Prefix affinity: send a conversation back to the replica that already holds
its prefix in its KV cache.

Engines keep the prompt they last processed (llama-server in its slots and
its host-RAM prompt cache, vLLM in its prefix cache), so turn N+1 of a
conversation is cheap only on the replica that served turn N. The request's
affinity key is a chain of digests:

- the client's session (a header, or the OpenAI `user` field): one digest;
- otherwise the leading bytes of the conversation (the messages' roles and
  text, or the prompt), at most `prefix_bytes` of them, in blocks of
  `block_bytes`: digest k covers blocks 1..k, so turn N+1, which starts with
  turn N's messages, repeats turn N's digests and adds its own.

At the defaults (16 KiB in 1 KiB blocks) a long conversation costs about
40 microseconds to hash, look up and learn (tests/bench/routing/index.py).

The index maps digests to the replica that last took them. It is a fixed-size
table in a shared mapping (one file in the gateway's runtime folder), so
every worker process sees what every other one learned, without a lock: a
word is written in one store, and a torn or stale word costs a cache miss at
worst, never a wrong answer. It is set-associative (4 ways) and evicts the
way least recently written, so it holds the most recent conversations and
never grows.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from .policies import AffinitySettings
from .sharedmap import map_file

_WAYS = 4
_WORD_BYTES = 8
# Word 0 counts the writes (learn() calls); after it, sets of 4 words. A word:
# 24 bits of the digest (the tag), 24 bits of the write count when it was
# written (its age, wrapping), 16 bits of the replica's id (0: empty). The set
# is chosen by the digest's low bits, so a false match takes the same 24
# high bits in the same set: about 1 lookup in 4 million, and it costs a
# cache miss.
_TAG_SHIFT = 40
_STAMP_SHIFT = 16
_LOW16 = 0xFFFF
_LOW24 = 0xFFFFFF
_HEADER_WORDS = 1
_MASK64 = 0xFFFFFFFFFFFFFFFF
# What ends a role and a message in the hashed text. A client's text may hold
# them too; a collision costs a cache miss, never a wrong answer.
_ROLE_END = "\x1f"
# A role is a short word; a longer one is cut here.
_ROLE_BYTES = 32
_MESSAGE_END = "\x1e"


def _digest_int(digest: bytes) -> int:
    return int.from_bytes(digest, "little")


def session_chain(model: str, session: str) -> list[int]:
    """The chain of a request that names its session: one digest."""
    digest = hashlib.blake2b(f"{model}\x00session\x00{session}".encode(), digest_size=8).digest()
    return [_digest_int(digest)]


def prefix_text(payload: Mapping[str, Any], limit: int) -> bytes:
    """At most ``limit`` leading bytes of what the engine's prompt starts with:
    the messages' roles and text, or the prompt. Reads no more of the payload
    than it needs."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        pieces: list[str] = []
        size = 0
        for message in messages:
            if not isinstance(message, dict):
                break
            role = str(message.get("role"))[:_ROLE_BYTES]
            piece = f"{role}{_ROLE_END}{_content_text(message.get('content'), limit - size)}"
            pieces.append(piece + _MESSAGE_END)
            size += len(piece) + 1
            if size >= limit:
                break
        return "".join(pieces).encode("utf-8", "replace")[:limit]
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0] if isinstance(prompt[0], (str, list)) else prompt
    if isinstance(prompt, str):
        return prompt[:limit].encode("utf-8", "replace")[:limit]
    if isinstance(prompt, list):  # token ids
        return ",".join(str(t) for t in prompt[: limit // 2]).encode()[:limit]
    return b""


def _content_text(content: Any, limit: int) -> str:
    """At most ``limit`` characters of a message's content: its text, or
    its content parts' text (or type), reading no more parts than it needs."""
    limit = max(limit, 0)
    if isinstance(content, str):
        return content[:limit]
    if isinstance(content, list):
        pieces, size = [], 0
        for part in content:
            if size >= limit:
                break
            if isinstance(part, dict):
                piece = str(part.get("text") or part.get("type"))[: limit - size]
                pieces.append(piece)
                size += len(piece)
        return "".join(pieces)
    return "" if content is None else str(content)[:limit]


def prefix_chain(model: str, text: bytes, block_bytes: int) -> list[int]:
    """Digest k covers the first k whole blocks of ``text``; a text shorter
    than one block is one digest of itself. A last partial block is left out,
    since the next turn's bytes at its place go on past it.

    A digest is CRC-32 and Adler-32 of the prefix (each continued block by
    block, so a block costs two C calls), salted by the model's name and mixed
    into 64 bits: cheap enough for the request path, and a collision costs a
    cache miss, never a wrong answer.
    """
    if not text:
        return []
    salt = model.encode() + b"\x00prefix\x00"
    crc, adler = zlib.crc32(salt), zlib.adler32(salt)
    if len(text) < block_bytes:
        return [_mix(zlib.crc32(text, crc), zlib.adler32(text, adler))]
    chain = []
    view = memoryview(text)
    for start in range(0, len(text) - block_bytes + 1, block_bytes):
        block = view[start : start + block_bytes]
        crc, adler = zlib.crc32(block, crc), zlib.adler32(block, adler)
        chain.append(_mix(crc, adler))
    return chain


def _mix(crc: int, adler: int) -> int:
    """Two 32-bit sums as one 64-bit digest whose every bit depends on every
    input bit (splitmix64's finalizer), since the index takes its set from
    the low bits and its tag from the high ones."""
    z = crc << 32 | adler
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def request_chain(
    model: str, payload: Mapping[str, Any], session: str | None, settings: AffinitySettings
) -> list[int]:
    """The affinity chain of one request: by its session if it names one,
    else by the leading blocks of its conversation."""
    if not session:
        user = payload.get("user")
        session = user if isinstance(user, str) else None
    if session:
        return session_chain(model, session)
    return prefix_chain(model, prefix_text(payload, settings.prefix_bytes), settings.block_bytes)


def replica_ids(urls: Iterable[str]) -> dict[str, int]:
    """A small id (1..65535) per replica URL, the same in every worker and
    across reloads for a URL that stays (a collision takes the next free id,
    in URL order)."""
    ids: dict[str, int] = {}
    taken: set[int] = set()
    for url in sorted(set(urls)):
        candidate = _digest_int(hashlib.blake2b(url.encode(), digest_size=8).digest()) % _LOW16 + 1
        while candidate in taken:
            candidate = candidate % _LOW16 + 1
        ids[url] = candidate
        taken.add(candidate)
    return ids


class PrefixIndex:
    """Digest -> replica id, in a fixed-size set-associative table that the
    workers of one gateway share (see the module's docstring)."""

    def __init__(
        self,
        path: str | None = None,
        entries: int = AffinitySettings.index_entries,
    ) -> None:
        self.sets = max(entries // _WAYS, 1)
        self.entries = self.sets * _WAYS
        self._fd, self.path, self._map = map_file(
            path, self.size_bytes, "cortex-gateway-prefixes-", clear_if_resized=True
        )
        self._words = memoryview(self._map).cast("Q")

    @property
    def size_bytes(self) -> int:
        return (_HEADER_WORDS + self.entries) * _WORD_BYTES

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self._fd)

    def _find(self, digest: int) -> int:
        """The replica id stored for ``digest``, or 0."""
        tag = digest >> _TAG_SHIFT
        base = _HEADER_WORDS + (digest % self.sets) * _WAYS
        words = self._words
        for way in range(base, base + _WAYS):
            word = words[way]
            if word >> _TAG_SHIFT == tag and word & _LOW16:
                return word & _LOW16
        return 0

    def lookup(self, chain: list[int], known: Mapping[int, Any] | None = None) -> tuple[int, int]:
        """The replica id of the longest digest of ``chain`` in the index
        (counting only ids in ``known`` when given), and how many digests that
        covers; (0, 0) when none is. A binary search: a chain's digests are
        written together, so when digest k is present the shorter ones are too
        (eviction can break this only towards a shorter match)."""
        low, high, found = 0, len(chain), (0, 0)
        while low < high:
            middle = (low + high) // 2
            replica = self._find(chain[middle])
            if replica and (known is None or replica in known):
                found = (replica, middle + 1)
                low = middle + 1
            else:
                high = middle
        return found

    def learn(self, chain: list[int], replica: int) -> None:
        """Every digest of ``chain`` now belongs to ``replica``; a digest not
        there takes an empty way of its set, or the one written longest ago."""
        words = self._words
        # Two workers may take the same count; their writes then look equally old.
        stamp = (words[0] + 1) & _LOW24
        words[0] = stamp
        for digest in chain:
            tag = digest >> _TAG_SHIFT
            base = _HEADER_WORDS + (digest % self.sets) * _WAYS
            victim, oldest = base, -1
            for way in range(base, base + _WAYS):
                word = words[way]
                if word >> _TAG_SHIFT == tag or not word & _LOW16:
                    victim = way
                    break
                age = (stamp - ((word >> _STAMP_SHIFT) & _LOW24)) & _LOW24
                if age > oldest:
                    victim, oldest = way, age
            words[victim] = (tag << _TAG_SHIFT) | (stamp << _STAMP_SHIFT) | replica

    def used(self, sample_sets: int = 4096) -> int:
        """About how many words are in use: counted in the first
        ``sample_sets`` sets and scaled (digests spread evenly over the sets),
        so that a look at a large table does not read all of it."""
        sets = min(sample_sets, self.sets)
        words = self._words[_HEADER_WORDS : _HEADER_WORDS + sets * _WAYS]
        in_use = sum(1 for word in words if word & _LOW16)
        return in_use * self.sets // sets
