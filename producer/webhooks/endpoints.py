"""Webhook endpoints as the operator configures them: a JSON list, inline or `@path` to a file.

    [{"name": "app", "url": "https://hooks.example.com/openai", "secret": "whsec_...",
      "events": ["batch.completed", "batch.failed"]}]

`secret` may be a list (key rotation: every request is signed with each); `events` is optional (all
types). Endpoints live in configuration, not in requests, so a caller can never aim the gateway at an
address of its choosing. Errors name the endpoint and the field, never a secret's value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from producer.webhooks.destinations import IPNetwork, check_url
from producer.webhooks.signing import secret_key

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_EVENT_TYPE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")
_FIELDS = {"name", "url", "secret", "events"}


@dataclass(slots=True, frozen=True)
class WebhookEndpoint:
    """One receiver: where events go, the keys they are signed with, and which types it wants."""

    name: str
    url: str
    keys: tuple[bytes, ...] = field(repr=False)  # HMAC keys of the secrets, in the order given
    events: frozenset[str] | None = None  # None: every type

    @property
    def group(self) -> str:
        """Its consumer group on every outbox stream: each endpoint keeps its own delivery position."""
        return f"hook:{self.name}"

    def wants(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events

    def describe(self) -> dict[str, Any]:
        """For logs: no secret, and the URL without credentials or query (either may hold a token)."""
        url = urlsplit(self.url)
        host = f"[{url.hostname}]" if ":" in (url.hostname or "") else url.hostname
        shown = f"{url.scheme}://{host}{f':{url.port}' if url.port else ''}{url.path}"
        return {
            "name": self.name,
            "url": shown,
            "events": sorted(self.events) if self.events else "all",
            "secrets": len(self.keys),
        }


def _read(text: str) -> Any:
    source = "the setting"
    if text.lstrip().startswith("@"):
        path = Path(text.lstrip()[1:]).expanduser()
        source = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"webhook_endpoints: cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:  # its message has a position, never the text
        raise ValueError(f"webhook_endpoints: {source} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def _endpoint(index: int, raw: Any, allowed: Sequence[IPNetwork]) -> WebhookEndpoint:
    where = f"webhook_endpoints[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be an object with name, url, secret and optionally events")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} (known: {sorted(_FIELDS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}.name: must be 1-64 of letters, digits and ._-")
    where = f"webhook endpoint {name!r}"
    url = raw.get("url")
    if not isinstance(url, str):
        raise ValueError(f"{where}: url must be a string")
    try:
        check_url(url, allowed)
    except ValueError as exc:
        raise ValueError(f"{where}: url: {exc}") from None
    given = raw.get("secret")
    secrets = [given] if isinstance(given, str) else given
    if not isinstance(secrets, list) or not secrets or not all(isinstance(s, str) for s in secrets):
        raise ValueError(f"{where}: secret must be a whsec_ string or a non-empty list of them")
    try:
        keys = tuple(secret_key(s) for s in secrets)
    except ValueError as exc:
        raise ValueError(f"{where}: secret: {exc}") from None
    events = raw.get("events")
    if events is not None:
        if (
            not isinstance(events, list)
            or not events
            or not all(isinstance(e, str) and _EVENT_TYPE.match(e) for e in events)
        ):
            raise ValueError(f"{where}: events must be a non-empty list of event types such as 'batch.completed'")
        events = frozenset(events)
    return WebhookEndpoint(name, url, keys, events)


def load_endpoints(text: str | None, allowed: Sequence[IPNetwork] = ()) -> tuple[WebhookEndpoint, ...]:
    """The endpoints of the `webhook_endpoints` setting (none when it is unset); ValueError when invalid."""
    if text is None or not text.strip():
        return ()
    raw = _read(text)
    if not isinstance(raw, list):
        raise ValueError("webhook_endpoints: must be a JSON list of endpoints")
    endpoints = tuple(_endpoint(i, item, allowed) for i, item in enumerate(raw))
    names = [e.name for e in endpoints]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"webhook_endpoints: names must be unique, repeated: {duplicated}")
    return endpoints
