"""API keys and who they are: `Z_IMAGE_API_KEYS_FILE` lines `NAME ROLE SECRET`, plus `Z_IMAGE_API_KEY`.

Every image belongs to the key that made it. A `user` key sees only its own images; an `admin`
key sees everyone's. SECRET is the key itself or `sha256:HEX` of it, so the file need not hold
keys in the clear. Keys are looked up by the SHA-256 of the token a request sends: one dict
lookup, whatever the number of keys, and nothing about a stored secret leaks through timing.
Without any key every request is `anonymous`, an admin (the server binds 127.0.0.1 by default).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["admin", "user"]
ROLES = ("admin", "user")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
HASHED_PREFIX = "sha256:"
SINGLE_KEY_NAME = "admin"  # the owner of images made with Z_IMAGE_API_KEY


class KeysFileError(ValueError):
    """The keys file cannot be used; the message is one line naming the file and line."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def sees(self) -> str | None:
        """Whose images this principal lists and reads: its own, or everyone's (None)."""
        return None if self.is_admin else self.name


ANONYMOUS = Principal("anonymous", "admin")
# Where no key was checked (a signed link's request): sees nothing. Its name cannot be a key's.
NOBODY = Principal("-", "user")
RESERVED_NAMES = (SINGLE_KEY_NAME, ANONYMOUS.name)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeys:
    """The keys a server accepts, by the SHA-256 of each secret."""

    by_digest: dict[str, Principal]

    @property
    def required(self) -> bool:
        return bool(self.by_digest)

    def resolve(self, token: str) -> Principal | None:
        return self.by_digest.get(digest(token))

    @classmethod
    def load(cls, single_key: str | None, keys_file: Path | None) -> ApiKeys:
        """Z_IMAGE_API_KEY (an admin named `admin`) and the keys file's lines; KeysFileError for a bad file."""
        by_digest: dict[str, Principal] = {}
        if single_key is not None:
            by_digest[digest(single_key)] = Principal(SINGLE_KEY_NAME, "admin")
        if keys_file is not None:
            for principal, secret_digest in read_keys_file(keys_file):
                if secret_digest in by_digest:
                    raise KeysFileError(f"{keys_file}: key '{principal.name}' has the same secret as another key")
                by_digest[secret_digest] = principal
        return cls(by_digest)


def read_keys_file(path: Path) -> list[tuple[Principal, str]]:
    """(principal, secret digest) per line; KeysFileError names the first bad line (never its secret)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"cannot read the API keys file {path}: {exc}") from None
    keys: list[tuple[Principal, str]] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        # Only whole-line comments: a secret may hold '#'.
        line = "" if raw.lstrip().startswith("#") else raw.strip()
        if not line:
            continue
        fields = line.split()
        where = f"{path} line {number}"
        if len(fields) != 3:
            raise KeysFileError(f"{where}: expected 'NAME ROLE SECRET', found {len(fields)} fields")
        name, role, secret = fields
        if not NAME_PATTERN.match(name):
            raise KeysFileError(f"{where}: invalid name {name!r} (letters, digits and _.@- only, at most 128)")
        if name in RESERVED_NAMES:
            raise KeysFileError(f"{where}: the name {name!r} is reserved (Z_IMAGE_API_KEY's and keyless requests')")
        if role not in ROLES:
            raise KeysFileError(f"{where}: role must be admin or user, not {role!r}")
        if name in names:
            raise KeysFileError(f"{where}: the name {name!r} is used twice")
        if secret.startswith(HASHED_PREFIX):
            secret_digest = secret[len(HASHED_PREFIX) :].lower()
            if not re.fullmatch(r"[0-9a-f]{64}", secret_digest):
                raise KeysFileError(f"{where}: sha256: must be followed by 64 hex digits")
        elif len(secret) < 8:
            raise KeysFileError(f"{where}: the secret of {name!r} is shorter than 8 characters")
        else:
            secret_digest = digest(secret)
        names.add(name)
        keys.append((Principal(name, role), secret_digest))  # type: ignore[arg-type]
    return keys
