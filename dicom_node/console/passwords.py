"""The admin password, stored only as a salted scrypt hash (``console.admin_password_hash``).

scrypt from the standard library (``hashlib.scrypt``, OpenSSL's implementation): a memory-hard password hash with no
extra dependency. The stored form is ``scrypt$n$r$p$salt$hash`` (salt and hash in base64), so the cost can be raised
later without invalidating older hashes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

PREFIX = "scrypt"
N, R, P = 2**14, 8, 1  # 16 MiB, ~50 ms on one core: slow for a guesser, quick for one login
SALT_BYTES = 16
KEY_BYTES = 32


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    """A new salted hash of ``password`` in the stored form."""
    if not password:
        raise ValueError("the password must not be empty")
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES)
    return "$".join([PREFIX, str(n), str(r), str(p), _b64(salt), _b64(key)])


def is_password_hash(value: str) -> bool:
    """``value`` has the stored form (what the configuration check accepts)."""
    return _parse(value) is not None


def verify_password(password: str, stored: str) -> bool:
    """``password`` matches ``stored``, compared in constant time; False for any malformed ``stored``."""
    parsed = _parse(stored)
    if parsed is None or not password:
        return False
    n, r, p, salt, key = parsed
    candidate = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(key),
                               maxmem=256 * 1024 * 1024)
    return hmac.compare_digest(candidate, key)


def _parse(value: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = value.strip().split("$")
    if len(parts) != 6 or parts[0] != PREFIX:
        return None
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        return None
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or n * r > 2**24 or not salt or len(key) < 16:
        return None
    return n, r, p, salt, key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
