"""API keys: configured as `name:sha256hex` lines (only hashes are stored), checked on every request but public ones.

A key is `blipq_` + 256 random bits. Being random and long, it needs no slow password hash: SHA-256 of it is enough
to make the stored lines useless to whoever reads them. A request's key is hashed and compared, in constant time,
with every configured hash; the matching key's name is the request's identity (`g.api_key_name`): it owns the jobs
that the request makes and is what rate limits count.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from flask import Flask, current_app, g, request

from api.errors import UnauthorizedError
from contract.errors import SettingsError

KEY_PREFIX = "blipq_"  # makes a leaked key recognisable (secret scanners, logs)
KEY_BYTES = 32  # 256 random bits
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")
PUBLIC_ATTRIBUTE = "blipq_public"

View = TypeVar("View", bound=Callable[..., object])


@dataclass(frozen=True)
class ApiKey:
    """A configured key: its name (the owner of its jobs) and the SHA-256 of the key, in hex."""

    name: str
    sha256: str


def hash_api_key(key: str) -> str:
    """The SHA-256 of a key, in hex: what the configuration stores."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh random key."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def parse_api_keys(entries: list[str], source: str) -> tuple[ApiKey, ...]:
    """Parse `name:sha256hex` entries (blank ones and `#` comments skipped); raises SettingsError naming `source`."""
    keys: list[ApiKey] = []
    for number, raw in enumerate(entries, start=1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, _, digest = entry.partition(":")
        name, digest = name.strip(), digest.strip().lower()
        if not NAME_PATTERN.match(name):
            raise SettingsError(f"{source}: entry {number}: expected name:sha256hex, the name 1-64 of A-Za-z0-9_.-")
        if not HASH_PATTERN.match(digest):
            # Not naming the entry: it may be a key pasted by mistake, and errors end up in logs.
            raise SettingsError(f"{source}: entry {number}: expected name:sha256hex, the hash 64 hex digits")
        keys.append(ApiKey(name, digest))
    return tuple(keys)


def authenticate(presented: str, keys: tuple[ApiKey, ...]) -> str | None:
    """The name of the configured key that `presented` is, or None.

    Every configured hash is compared, with hmac.compare_digest, whatever matched before: the time taken does not say
    how many leading characters matched, nor which key (if any) did.
    """
    digest = hash_api_key(presented)
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.sha256):
            found = key.name
    return found


def public(view: View) -> View:
    """Mark a view as open to requests without a key (health and readiness checks, the API description)."""
    setattr(view, PUBLIC_ATTRIBUTE, True)
    return view


def install_api_keys(app: Flask, keys: tuple[ApiKey, ...]) -> None:
    """Require one of `keys` on every request to `app` but public views; no keys: the API stays open."""
    if not keys:
        return

    @app.before_request
    def require_api_key() -> None:
        if is_public_request():
            return
        presented = _presented_key()
        if not presented:
            raise UnauthorizedError("api_key_missing", "send an API key: 'Authorization: Bearer <key>' or 'X-API-Key'")
        name = authenticate(presented, keys)
        if name is None:
            raise UnauthorizedError("api_key_invalid", "this API key is not valid")
        g.api_key_name = name


def is_public_request() -> bool:
    """Whether the request is for a view marked @public."""
    view = current_app.view_functions.get(request.endpoint or "")
    return bool(getattr(view, PUBLIC_ATTRIBUTE, False))


def api_key_name() -> str:
    """The name of the request's API key; "" when API keys are off."""
    return str(g.get("api_key_name", ""))


def _presented_key() -> str:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("X-API-Key", "").strip()
