"""One attempt against a real local receiver: TLS checked against the URL's name while the connection goes to
the checked address, redirects not followed, refused destinations never contacted, one deadline."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from producer.webhooks.destinations import parse_networks
from producer.webhooks.endpoints import WebhookEndpoint
from producer.webhooks.outbox import OutboxEvent
from producer.webhooks.sender import Outcome, Result, Sender
from producer.webhooks.signing import new_secret, secret_key
from tests.producer.gateway.webhook_receiver import Receiver
from tests.security.certs import make_ca

LOOPBACK = parse_networks("127.0.0.0/8")
EVENT = OutboxEvent("1-0", "evt_batch_x_completed", "batch.completed", "batch_x", 1_750_000_000)
SECRET = new_secret()


def _send(url: str, allowed: tuple = LOOPBACK, timeout_s: float = 10.0) -> Result:
    async def attempt() -> Result:
        sender = Sender(WebhookEndpoint("t", url, (secret_key(SECRET),)), timeout_s, allowed)
        try:
            return await sender.send(EVENT)
        finally:
            await sender.close()

    return asyncio.run(attempt())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def _tls_for_localhost_only(directory: Path) -> ssl.SSLContext:
    """A server context whose certificate names `localhost` and no address: verifying it against
    127.0.0.1 would fail, so a delivery that succeeds was verified against the URL's name."""
    ca, ca_cert, ca_key = make_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "leaf.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "leaf.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "leaf.crt", directory / "leaf.key")
    return context


def test_https_goes_to_the_checked_address_and_verifies_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.crt"))  # the operator's CA bundle still counts
    server = Receiver().start(tls=_tls_for_localhost_only(tmp_path))
    try:
        result = _send(server.url("/in", host="localhost", scheme="https"))
        assert result.outcome is Outcome.DELIVERED, result.detail
        (delivery,) = server.deliveries("/in")
        assert delivery.headers["host"] == f"localhost:{server.port}"
        assert openai.OpenAI(api_key="x").webhooks.unwrap(delivery.body, delivery.headers, secret=SECRET).id == EVENT.id
        by_address = _send(server.url("/in", scheme="https"))  # the certificate does not name 127.0.0.1
        assert by_address.outcome is Outcome.FAILED and "CERTIFICATE_VERIFY_FAILED" in by_address.detail
    finally:
        server.stop()


def test_redirects_are_not_followed_and_count_as_failures(receiver: Receiver) -> None:
    receiver.script("/moved", 307)
    receiver.headers["/moved"] = {"location": receiver.url("/elsewhere")}
    result = _send(receiver.url("/moved"))
    assert (result.outcome, result.detail) == (Outcome.FAILED, "HTTP 307")
    assert receiver.deliveries("/elsewhere") == []


def test_statuses_map_to_outcomes_and_proxies_from_the_environment_are_not_used(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there: a proxied attempt would fail
    receiver.script("/s", 204, 410, 400, 500)
    assert [_send(receiver.url("/s")).outcome for _ in range(4)] == [
        Outcome.DELIVERED,
        Outcome.GONE,
        Outcome.FAILED,
        Outcome.FAILED,
    ]


def test_a_refused_destination_is_never_contacted(receiver: Receiver) -> None:
    result = _send(receiver.url("/x", host="localhost"), allowed=())
    assert result.outcome is Outcome.REFUSED and "which is loopback" in result.detail
    assert receiver.received == []


def test_an_attempt_has_one_deadline(receiver: Receiver) -> None:
    receiver.hold("/slow")
    result = _send(receiver.url("/slow"), timeout_s=0.5)
    assert result.outcome is Outcome.FAILED and result.status is None
