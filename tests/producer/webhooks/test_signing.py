"""Signatures against the openai SDK's own verification (its unwrap and its 5-minute tolerance)."""

from __future__ import annotations

import base64
import json
import time

import openai
import pytest

from producer.webhooks.outbox import OutboxEvent
from producer.webhooks.signing import new_secret, secret_key, signature, signed_headers

SDK = openai.OpenAI(api_key="x")
EVENT = OutboxEvent("1-0", "evt_batch_abc_completed", "batch.completed", "batch_abc", 1_750_000_000)


def test_a_signed_event_unwraps_with_the_sdk_into_openais_event() -> None:
    secret = new_secret()
    body = EVENT.body()
    headers = signed_headers((secret_key(secret),), EVENT.id, body)
    assert headers["webhook-id"] == EVENT.id and headers["webhook-signature"].startswith("v1,")
    event = SDK.webhooks.unwrap(body, headers, secret=secret)
    assert (event.id, event.type, event.created_at, event.data.id) == (
        EVENT.id,
        "batch.completed",
        1_750_000_000,
        "batch_abc",
    )
    assert json.loads(body)["object"] == "event"


def test_every_secret_of_a_rotation_verifies_and_a_stranger_does_not() -> None:
    old, new = new_secret(), new_secret()
    body = EVENT.body()
    headers = signed_headers((secret_key(old), secret_key(new)), EVENT.id, body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        SDK.webhooks.verify_signature(body, headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.verify_signature(body, headers, secret=new_secret())


def test_a_changed_body_id_or_stale_timestamp_fails_verification() -> None:
    secret = new_secret()
    key = secret_key(secret)
    body = EVENT.body()
    headers = signed_headers((key,), EVENT.id, body)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.verify_signature(body.replace(b"abc", b"abd"), headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.verify_signature(body, {**headers, "webhook-id": "evt_other"}, secret=secret)
    stale = signed_headers((key,), EVENT.id, body, timestamp=int(time.time()) - 600)
    with pytest.raises(openai.InvalidWebhookSignatureError, match="too old"):
        SDK.webhooks.verify_signature(body, stale, secret=secret)


def test_the_signature_is_hmac_sha256_of_id_timestamp_and_body() -> None:
    # Standard Webhooks' published example: its secret, message id, timestamp, payload and signature
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert signature(secret_key(secret), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected


def test_new_secrets_are_whsec_base64_of_32_bytes_and_bad_ones_are_refused_without_echo() -> None:
    made = new_secret()
    assert made.startswith("whsec_") and len(base64.b64decode(made[6:])) == 32 and made != new_secret()
    for bad in ("plain-text", "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError) as caught:
            secret_key(bad)
        assert bad not in str(caught.value)
