"""Client API keys, kept only as SHA-256 digests.

Keys are random tokens of 32 bytes or more, not passwords: a fast hash cannot
be brute-forced at that entropy, so a slow KDF (bcrypt, argon2) would only add
tens of milliseconds to every request. The digest doubles as the lookup key,
so checking a key is one hash and one dict lookup.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _space, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyRing:
    """Maps presented keys to key names without ever holding a key."""

    def __init__(self, digests: Mapping[str, str]) -> None:
        self._names = dict(digests)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key in an Authorization header, or None."""
        token = bearer_token(authorization)
        if token is None:
            return None
        return self._names.get(hash_key(token))
