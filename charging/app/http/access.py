"""Who may call the gateway: API keys, and how fast.

A key is a random bearer token; the keys file holds only its SHA-256, so the file can be
read without revealing a key. A slow password hash (bcrypt, scrypt) is for guessable
secrets; a 256-bit random token cannot be guessed, and a fast hash keeps every request
cheap. Each key has scopes and, optionally, patterns of the accounts it may touch.

With no keys file the gateway serves loopback callers only, with every scope.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import time
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

SCOPES = ("charge", "authorize", "reserve", "read", "admin")
TOKEN_PREFIX = "chk_"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_FIELDS = {"sha256", "scopes", "accounts", "rate", "burst"}


class KeysFileError(ValueError):
    pass


@dataclass(frozen=True)
class Caller:
    """Whoever made a request: a key from the keys file, or a loopback caller when there
    is none. accounts: fnmatch patterns of the accounts it may touch (None: every one).
    rate: requests per second per gateway process (None: no limit), in bursts of burst."""

    name: str
    scopes: frozenset[str]
    accounts: tuple[str, ...] | None = None
    rate: float | None = None
    burst: int = 1

    def may_touch(self, account: str) -> bool:
        return self.accounts is None or any(fnmatchcase(account, pattern) for pattern in self.accounts)


LOOPBACK = Caller("loopback", frozenset(SCOPES))


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class Keyring:
    """The keys by the SHA-256 of their token."""

    by_digest: dict[str, Caller] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.by_digest

    def identify(self, token: str) -> Caller | None:
        return self.by_digest.get(digest(token))

    @classmethod
    def load(cls, path: Path | None) -> Keyring:
        if path is None:
            return cls()
        try:
            table = tomllib.loads(Path(path).read_text()).get("keys", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise KeysFileError(f"cannot read API keys from {path}: {exc}") from None
        ring = cls()
        for name, entry in table.items():
            sha, caller = _caller(name, entry, path)
            if sha in ring.by_digest:
                raise KeysFileError(f"{path}: keys {ring.by_digest[sha].name!r} and {name!r} are the same key")
            ring.by_digest[sha] = caller
        return ring


def _caller(name: str, entry: object, path: Path) -> tuple[str, Caller]:
    where = f"{path}: key {name!r}"
    if not _NAME.fullmatch(name) or not isinstance(entry, dict):
        raise KeysFileError(f"{where}: a key is a [keys.NAME] table, NAME of 1-64 of A-Z a-z 0-9 _ . -")
    if unknown := set(entry) - _KEY_FIELDS:
        raise KeysFileError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_KEY_FIELDS)}")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise KeysFileError(f"{where}: sha256 must be the 64 lowercase hex digits of the token's SHA-256")
    scopes = entry.get("scopes")
    if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
        raise KeysFileError(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}")
    accounts = entry.get("accounts")
    if accounts is not None and (not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts)):
        raise KeysFileError(f"{where}: accounts must be a list of account ids or patterns (account1, partner-*)")
    rate, burst = entry.get("rate"), entry.get("burst")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0):
        raise KeysFileError(f"{where}: rate must be requests per second above 0")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
        raise KeysFileError(f"{where}: burst must be a whole number of requests, at least 1")
    return sha, Caller(name, frozenset(scopes), None if accounts is None else tuple(accounts),
                       None if rate is None else float(rate), burst or max(1, int(rate or 1)))


def new_key(name: str, scopes: list[str], accounts: list[str] | None = None, rate: float | None = None) -> tuple[str, str]:
    """A new token and the keys-file table that admits it (the token itself is not in it)."""
    if not _NAME.fullmatch(name):
        raise KeysFileError(f"key name {name!r}: 1-64 of A-Z a-z 0-9 _ . -")
    if not scopes or not set(scopes) <= set(SCOPES):
        raise KeysFileError(f"scopes must be some of {', '.join(SCOPES)}; got {scopes}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    lines = [f"[keys.{name}]", f'sha256 = "{digest(token)}"', "scopes = [" + ", ".join(f'"{s}"' for s in scopes) + "]"]
    if accounts:
        lines.append("accounts = [" + ", ".join(f'"{a}"' for a in accounts) + "]")
    if rate:
        lines.append(f"rate = {rate:g}")
    return token, "\n".join(lines) + "\n"


class Limiter:
    """A token bucket per caller, in this process: a gateway of N processes lets a key do
    up to N times its rate."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    def wait_s(self, caller: Caller) -> float:
        """0 when the request may go now (and takes a token), else the seconds until it may."""
        if caller.rate is None:
            return 0.0
        now = time.monotonic()
        tokens, at = self._buckets.get(caller.name, (float(caller.burst), now))
        tokens = min(float(caller.burst), tokens + (now - at) * caller.rate)
        if tokens < 1:
            self._buckets[caller.name] = (tokens, now)
            return (1 - tokens) / caller.rate
        self._buckets[caller.name] = (tokens - 1, now)
        return 0.0
