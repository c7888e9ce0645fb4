"""Standard Webhooks signatures: `whsec_` secrets, the `webhook-*` headers, one `v1,` signature per secret.

What is signed is `<webhook-id>.<webhook-timestamp>.<body>` with HMAC-SHA256 under the secret's key
(the base64 text after `whsec_`), so the openai SDK's `client.webhooks.unwrap(body, headers, secret=...)`
and the Standard Webhooks libraries verify it unchanged. During a key rotation an endpoint has several
secrets and every request carries one signature per secret (space-separated): receivers holding the
old secret and those holding the new one both accept it. The timestamp is the attempt's own (receivers
refuse one more than 5 minutes off, the SDK's tolerance), so a retry is signed afresh over the same id
and body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time

SECRET_PREFIX = "whsec_"
KEY_BYTES = 32  # what `new_secret` makes; Standard Webhooks asks for 24 to 64
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64


def new_secret() -> str:
    """A fresh secret for a receiver and the gateway to share (`tokenrelay webhooks secret`)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret. The ValueError never quotes the secret: it ends up in logs."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret must start with {SECRET_PREFIX!r} (make one: tokenrelay webhooks secret)")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"a webhook secret must be {SECRET_PREFIX!r} then base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a webhook secret's key must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, got {len(key)}")
    return key


def signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of a request."""
    signed = b"%s.%d.%s" % (webhook_id.encode(), timestamp, body)
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(
    keys: tuple[bytes, ...], webhook_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt (now, unless `timestamp` says otherwise)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(key, webhook_id, timestamp, body) for key in keys),
    }
