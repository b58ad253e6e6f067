"""Bearer API keys: where they come from and how a request's token is checked.

Keys live in the replica's own environment (a cluster Secret): ``FORGE_API_KEYS`` (comma-separated)
or ``FORGE_API_KEYS_FILE`` (one key per line). A local ``forge serve`` may hand them over as an
init argument instead, wrapped in :class:`ApiKeys`, whose repr hides them, so neither logs nor
Serve's records of a deployment's arguments ever show a key.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence

from orchestrator.errors import ForgeError
from serve.errors import Unauthorized

API_KEYS_ENV = "FORGE_API_KEYS"
API_KEYS_FILE_ENV = "FORGE_API_KEYS_FILE"


def parse_api_keys(value: str | None) -> tuple[str, ...]:
    """Keys from a comma-separated string; blanks and surrounding spaces are dropped."""
    return tuple(k.strip() for k in (value or "").split(",") if k.strip())


def read_api_keys_file(path: str) -> tuple[str, ...]:
    """Keys from a file, one per line; blank lines and lines starting with '#' are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ForgeError(f"{API_KEYS_FILE_ENV}={path}: cannot read the API keys file ({e})") from None
    return tuple(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))


def keys_from_environment(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The keys this process's environment names: ``FORGE_API_KEYS`` and ``FORGE_API_KEYS_FILE``."""
    env = os.environ if env is None else env
    keys = parse_api_keys(env.get(API_KEYS_ENV))
    path = env.get(API_KEYS_FILE_ENV)
    if path:
        keys += read_api_keys_file(path)
    return keys


def check_keys_usable(keys: Sequence[str]) -> None:
    """Raise ForgeError for keys that would never match a header (empty, commas, spaces)."""
    if any("," in k or not k.strip() or k != k.strip() or " " in k for k in keys):
        raise ForgeError("API keys must be non-empty and contain no commas or spaces")


class ApiKeys:
    """Bearer keys for the API, compared in constant time; the repr never shows them."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} hidden>)"

    __str__ = __repr__

    def check(self, header: str | None) -> None:
        """Raise Unauthorized unless ``header`` is ``Bearer <one of the keys>``."""
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        given = token.encode("utf-8", "surrogateescape")
        ok = False
        for key in self._keys:  # compare with every key: timing must not tell which one matched
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise Unauthorized("invalid API key")


def resolve_api_keys(given: ApiKeys | None, allow_no_auth: bool) -> ApiKeys:
    """The keys a replica uses: ``given`` (from ``forge serve``; may be empty), else (None) its
    own environment's.

    With none and no ``allow_no_auth`` this raises, so the deployment fails instead of serving
    openly.
    """
    keys = given if given is not None else ApiKeys(keys_from_environment())
    if not keys and not allow_no_auth:
        raise ForgeError(
            f"no API keys: set {API_KEYS_ENV}=key1,key2 or {API_KEYS_FILE_ENV}=/path/to/keys in "
            "the replicas' environment (clients send 'Authorization: Bearer key1'), or set "
            "allow_no_auth to serve without authentication (not for shared networks)"
        )
    return keys
