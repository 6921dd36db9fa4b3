"""Client API keys, kept only as SHA-256 digests.

Keys are random tokens of 32 bytes or more, not passwords: a fast hash cannot
be brute-forced at that entropy, so a slow KDF (bcrypt, argon2) would only add
tens of milliseconds to every request. The digest doubles as the lookup key,
so checking a key is one hash and one dict lookup.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def presented_key(authorization: str | None) -> str | None:
    """The key in an Authorization header: `Bearer <key>`, as OpenAI's clients
    send it, or `Basic` with the key as the password (the user name is not
    read), as tools that keep passwords out of their logs send it."""
    if not authorization:
        return None
    scheme, _space, token = authorization.partition(" ")
    token = token.strip()
    if not token:
        return None
    if scheme.lower() == "bearer":
        return token
    if scheme.lower() == "basic":
        try:
            _user, colon, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password if colon and password else None
    return None


class KeyRing:
    """Maps presented keys to key names without ever holding a key."""

    def __init__(self, digests: Mapping[str, str]) -> None:
        self._names = dict(digests)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key in an Authorization header, or None."""
        token = presented_key(authorization)
        if token is None:
            return None
        return self._names.get(hash_key(token))
