"""API keys in the Authorization header: Bearer, or Basic with the key as the password."""

from __future__ import annotations

import base64

import pytest
from cortex_gateway.auth import KeyRing, hash_key, presented_key

KEY = "sk-0123456789abcdef0123456789abcdef"


def basic(user_and_password: str) -> str:
    return "Basic " + base64.b64encode(user_and_password.encode()).decode()


@pytest.mark.parametrize(
    ("header", "key"),
    [
        (f"Bearer {KEY}", KEY),
        (f"bearer   {KEY}  ", KEY),
        (basic(f"admin:{KEY}"), KEY),
        (basic(f":{KEY}"), KEY),  # the user name is not read
        (basic("admin:a:b"), "a:b"),  # only the first colon separates
        (basic("admin:"), None),
        (basic(KEY), None),  # no colon: no password
        ("Basic not-base64!", None),
        ("Basic " + base64.b64encode(b"u:\xff").decode(), None),
        (f"Token {KEY}", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_the_key_is_read_from_bearer_or_basic(header, key):
    assert presented_key(header) == key


def test_a_keyring_names_the_key_whichever_scheme_carries_it():
    ring = KeyRing({hash_key(KEY): "ops"})
    assert ring.identify(f"Bearer {KEY}") == "ops"
    assert ring.identify(basic(f"ansible:{KEY}")) == "ops"
    assert ring.identify(basic("ansible:wrong")) is None
