"""Optional bearer API keys: from a key file and/or TOKENRELAY_API_KEYS; none configured means open."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from producer.gateway.errors import APIError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class APIKeys:
    """Keys are kept as SHA-256 digests only; a key file may list `sha256:<hex>` instead of the key itself."""

    def __init__(self, digests: list[bytes]) -> None:
        self._digests = digests

    @classmethod
    def load(cls, key_file: str | None = None, env: str | None = None) -> APIKeys:
        entries: list[str] = []
        if key_file:
            for line in Path(key_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entries.append(line)
        env = os.environ.get("TOKENRELAY_API_KEYS", "") if env is None else env
        entries += [e.strip() for e in env.split(",") if e.strip()]
        digests = []
        for entry in entries:
            if entry.startswith("sha256:"):
                hexdigest = entry.removeprefix("sha256:")
                if len(hexdigest) != 64:
                    raise ValueError("api keys: a sha256: entry must have 64 hex digits")
                digests.append(bytes.fromhex(hexdigest))
            else:
                digests.append(_digest(entry))
        return cls(digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner(self, authorization: str | None) -> str:
        """Who is calling, for objects only their creator may see (files, batches, responses): a short
        fingerprint of the key (never the key), or "" when no keys are configured. Raises the 401 of check."""
        self.check(authorization)
        if not self.enabled:
            return ""
        return _digest((authorization or "").partition(" ")[2].strip()).hex()[:16]

    def check(self, authorization: str | None) -> None:
        """Raises a 401 unless the `Authorization: Bearer <key>` header names a configured key."""
        if not self.enabled:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "Missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")
        digest = _digest(key.strip())
        # compare against every key so the time taken does not tell which prefix matched
        if not any([hmac.compare_digest(digest, known) for known in self._digests]):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
