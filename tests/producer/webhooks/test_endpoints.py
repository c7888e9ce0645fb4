"""The endpoint list: inline JSON or @file, its validation, and what a log line may show of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.webhooks.endpoints import load_endpoints
from producer.webhooks.signing import new_secret, secret_key


def test_inline_and_file_lists_load_with_rotation_and_filters(tmp_path: Path) -> None:
    old, new = new_secret(), new_secret()
    raw = [
        {"name": "app", "url": "https://u:pw@hooks.example.com:8443/in?token=t", "secret": [old, new]},
        {"name": "ops", "url": "https://ops.example.com/", "secret": old, "events": ["batch.failed"]},
    ]
    path = tmp_path / "hooks.json"
    path.write_text(json.dumps(raw))
    for text in (json.dumps(raw), f"@{path}"):
        app, ops = load_endpoints(text)
        assert app.keys == (secret_key(old), secret_key(new)) and app.events is None and app.wants("anything.else")
        assert ops.events == frozenset({"batch.failed"}) and not ops.wants("batch.completed")
        assert app.group == "hook:app"
    shown = json.dumps(app.describe())
    assert "pw" not in shown and "token" not in shown and old not in shown and old not in repr(app)
    assert app.describe()["url"] == "https://hooks.example.com:8443/in"
    assert load_endpoints(None) == () and load_endpoints("  ") == ()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "x"}, "must be a JSON list"),
        (["x"], r"webhook_endpoints\[0\]: must be an object"),
        ([{"name": "a b", "url": "https://e.com/", "secret": "s"}], r"\.name: must be 1-64"),
        ([{"name": "x", "url": "https://e.com/", "secret": "s", "filter": []}], r"unknown field\(s\) \['filter'\]"),
        ([{"name": "x", "url": "https://e.com/", "secret": []}], "secret must be a whsec_ string"),
        ([{"name": "x", "url": "https://e.com/", "secret": "SECRET"}], "secret: a webhook secret must start"),
        ([{"name": "x", "url": "https://e.com/", "secret": "@", "events": []}], "secret: a webhook secret"),
        ([{"name": "x", "url": "http://10.0.0.7/", "secret": "s"}], "url: refused destination: 10.0.0.7 is private"),
    ],
)
def test_invalid_lists_are_refused_with_the_field_named_and_no_secret(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        load_endpoints(json.dumps(raw))
    assert "SECRET" not in str(caught.value)


def test_events_and_names_are_checked() -> None:
    secret = new_secret()
    with pytest.raises(ValueError, match="events must be a non-empty list"):
        load_endpoints(json.dumps([{"name": "x", "url": "https://e.com/", "secret": secret, "events": ["Batch done"]}]))
    twice = [{"name": "x", "url": "https://e.com/", "secret": secret}] * 2
    with pytest.raises(ValueError, match=r"names must be unique, repeated: \['x'\]"):
        load_endpoints(json.dumps(twice))
    with pytest.raises(ValueError, match="cannot read"):
        load_endpoints("@/nonexistent/hooks.json")
    with pytest.raises(ValueError, match="the setting is not valid JSON: .* at line 1") as caught:
        load_endpoints(f'[{{"secret": "{secret}", ')
    assert secret not in str(caught.value)
