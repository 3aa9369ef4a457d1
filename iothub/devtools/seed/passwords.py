"""Django-compatible password hashes: `pbkdf2_sha256$<iterations>$<salt>$<base64 hash>`.

The original project stored users through Django, so a hash written here verifies in Django and a
hash written by Django verifies here; `users.password` never holds the plain password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string
from typing import Final

ALGORITHM: Final = "pbkdf2_sha256"
# Django 4.2's default. Hashing costs about 0.1 s per password on this class of machine, which
# is what makes a stolen table expensive to crack; the three seed users pay it once per run.
DEFAULT_ITERATIONS: Final = 600_000
SALT_LENGTH: Final = 22  # characters, as Django's get_random_string(22)
_SALT_ALPHABET: Final = string.ascii_letters + string.digits


class InvalidHash(ValueError):
    """The stored value is not a pbkdf2_sha256 hash."""


def _digest(raw: str, salt: str, iterations: int) -> str:
    derived = hashlib.pbkdf2_hmac("sha256", raw.encode(), salt.encode(), iterations)
    return base64.b64encode(derived).decode("ascii")


def hash_password(raw: str, salt: str | None = None, iterations: int = DEFAULT_ITERATIONS) -> str:
    """The encoded hash of `raw`; a random salt unless one is given (tests, fixtures)."""
    if salt is None:
        salt = "".join(secrets.choice(_SALT_ALPHABET) for _ in range(SALT_LENGTH))
    if not salt or "$" in salt:
        raise ValueError("the salt must be non-empty and must not contain '$'")
    if iterations < 1:
        raise ValueError("iterations must be positive")
    return f"{ALGORITHM}${iterations}${salt}${_digest(raw, salt, iterations)}"


def split(encoded: str) -> tuple[int, str, str]:
    """(iterations, salt, hash) of an encoded value; raises InvalidHash."""
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != ALGORITHM or not parts[1].isdigit() or not parts[2]:
        raise InvalidHash(InvalidHash.__doc__)
    return int(parts[1]), parts[2], parts[3]


def check_password(raw: str, encoded: str) -> bool:
    """Whether `raw` is the password `encoded` was made from (False for anything not a hash)."""
    try:
        iterations, salt, _ = split(encoded)
    except InvalidHash:
        return False
    if iterations < 1:
        return False
    expected = hash_password(raw, salt=salt, iterations=iterations)
    # Constant time, so a timing difference does not tell how much of the hash matched.
    return hmac.compare_digest(expected.encode(), encoded.encode())


def is_hashed(value: str) -> bool:
    """Whether a stored value looks like a hash rather than a plain password."""
    try:
        split(value)
    except InvalidHash:
        return False
    return True


__all__ = [
    "ALGORITHM",
    "DEFAULT_ITERATIONS",
    "InvalidHash",
    "check_password",
    "hash_password",
    "is_hashed",
    "split",
]
