"""One delivery attempt: check the destination, sign, POST, and say what came of it.

The request goes to the very address the SSRF check passed (the URL's host swapped for it, `Host` and
TLS SNI kept as the name, so certificates are still verified against the name): resolving again inside
the HTTP client could return another address. Redirects are not followed (a 3xx is a failed attempt: a
receiver could otherwise bounce the gateway anywhere), the whole attempt has one deadline, the
response body is never read, and proxies from the environment are ignored (they would defeat the
address check; the CA bundle is still read from SSL_CERT_FILE / SSL_CERT_DIR when set). Each endpoint
has its own client: pooled connections are keyed by address, and two names on one address must not
share a TLS session.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass

import httpx

from producer.webhooks.destinations import IPNetwork, RefusedDestination, Unresolvable, resolve
from producer.webhooks.endpoints import WebhookEndpoint
from producer.webhooks.outbox import OutboxEvent
from producer.webhooks.signing import signed_headers

USER_AGENT = "tokenrelay-webhooks/1"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# httpx logs every request's URL at info, query string and all (it may carry a receiver's token)
logging.getLogger("httpx").setLevel(logging.WARNING)


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # 2xx
    GONE = "gone"  # 410: the receiver asks never to be called again
    FAILED = "failed"  # any other status, a timeout, a connection error: retried on schedule
    REFUSED = "refused"  # the destination is in a refused range: nothing was sent


@dataclass(slots=True, frozen=True)
class Result:
    outcome: Outcome
    detail: str  # the status code or the error, for logs and the dead-letter record
    seconds: float
    status: int | None = None


class Sender:
    """Sends events to one endpoint."""

    def __init__(self, endpoint: WebhookEndpoint, timeout_s: float, allowed: tuple[IPNetwork, ...]) -> None:
        self.endpoint = endpoint
        self.url = httpx.URL(endpoint.url)
        self.timeout_s = timeout_s
        self.allowed = allowed
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,  # no proxies from the environment; CAs from SSL_CERT_FILE / SSL_CERT_DIR still count
            verify=httpx.create_ssl_context(trust_env=True),
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=8),
            headers={"user-agent": USER_AGENT, "content-type": "application/json"},
        )

    async def send(self, event: OutboxEvent) -> Result:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                address = await resolve(self.url.host, self.url.port or _DEFAULT_PORTS[self.url.scheme], self.allowed)
                status = await self._post(address, event)
        except RefusedDestination as exc:
            return Result(Outcome.REFUSED, str(exc), time.monotonic() - started)
        except Unresolvable as exc:
            return Result(Outcome.FAILED, str(exc), time.monotonic() - started)
        except TimeoutError:
            return Result(Outcome.FAILED, f"no answer within {self.timeout_s} s", time.monotonic() - started)
        except httpx.HTTPError as exc:
            return Result(Outcome.FAILED, f"{type(exc).__name__}: {exc}"[:300], time.monotonic() - started)
        seconds = time.monotonic() - started
        if 200 <= status < 300:
            return Result(Outcome.DELIVERED, str(status), seconds, status)
        if status == 410:
            return Result(Outcome.GONE, str(status), seconds, status)
        return Result(Outcome.FAILED, f"HTTP {status}", seconds, status)

    async def _post(self, address: str, event: OutboxEvent) -> int:
        body = event.body()
        headers = signed_headers(self.endpoint.keys, event.id, body)
        headers["host"] = self.url.netloc.decode("ascii")
        extensions = {"sni_hostname": self.url.host} if self.url.scheme == "https" else {}
        request = self.client.build_request(
            "POST", self.url.copy_with(host=address), content=body, headers=headers, extensions=extensions
        )
        response = await self.client.send(request, stream=True)
        await response.aclose()  # the body is the receiver's business: never read it
        return response.status_code

    async def close(self) -> None:
        await self.client.aclose()
