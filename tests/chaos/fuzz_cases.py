"""Hypothesis strategies for what can land on a request stream: valid requests, near misses, garbage.

An entry is the stream entry's fields plus the request id an answer must be addressed to (None when
the entry carries no usable id: it can only be dead-lettered). Valid requests ask for few tokens, so
a no-op worker answers a hundred thousand of them quickly.
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgpack
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from producer.params import PARAM_NAMES
from producer.protocol import SCHEMA_VERSION, new_request_id

MODEL = "tiny"
FIELDS = [
    "v",
    "id",
    "model",
    "prompt",
    "messages",
    "prompt_token_ids",
    "params",
    "stream",
    "priority",
    "deadline",
    "submitted_at",
    "metadata",
]

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=24),
    st.binary(max_size=12),
    st.sampled_from(["", "tiny", "high", "a" * 32]),
)
values = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10) | st.sampled_from(sorted(PARAM_NAMES)), inner, max_size=5)
    ),
    max_leaves=16,
)

_prompt = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=64)}),
    st.fixed_dictionaries({"prompt_token_ids": st.lists(st.integers(0, 40_000), min_size=1, max_size=16)}),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=32)}
                ),
                min_size=1,
                max_size=3,
            )
        }
    ),
)
_params = st.fixed_dictionaries(
    {"max_tokens": st.integers(1, 8)},
    optional={
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "top_k": st.integers(-1, 50),
        "seed": st.integers(0, 2**32),
        "stop": st.lists(st.text(min_size=1, max_size=4), max_size=2),
        "ignore_eos": st.booleans(),
        "logprobs": st.integers(0, 3),
    },
)


@st.composite
def valid_bodies(draw: st.DrawFn, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "id": request_id,
        "model": MODEL,
        **draw(_prompt),
        "params": draw(_params),
        "stream": draw(st.booleans()),
        "priority": draw(st.sampled_from(["high", "normal", "low"])),
        "deadline": draw(st.none() | st.just(time.time() + 3600) | st.just(1.0)),
        "submitted_at": time.time(),
        "metadata": draw(st.none() | values),
    }
    return body


@st.composite
def corrupted_bodies(draw: st.DrawFn, request_id: str) -> dict[str, Any]:
    """A valid body with one field replaced, removed, or one sampling parameter set to anything."""
    body = draw(valid_bodies(request_id))
    how = draw(st.sampled_from(["replace", "remove", "param"]))
    name = draw(st.sampled_from(FIELDS))
    if how == "replace":
        body[name] = draw(values)
    elif how == "remove":
        body.pop(name, None)
    else:
        body["params"][draw(st.sampled_from(sorted(PARAM_NAMES)) | st.text(max_size=8))] = draw(values)
    return body


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Byte-level damage to an encoded request: overwrite, delete, insert, or cut at `position`."""
    out = bytearray(data)
    for kind, position, byte in edits:
        at = position % (len(out) + 1)
        if kind == 0 and at < len(out):
            out[at] = byte
        elif kind == 1 and at < len(out):
            del out[at]
        elif kind == 2:
            out.insert(at, byte)
        else:
            del out[at:]
    return bytes(out)


def _pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


@st.composite
def entries(draw: st.DrawFn) -> tuple[dict[str, bytes | str], str | None]:
    """(stream entry fields, the id an error event must reach or None)."""
    request_id = new_request_id()
    kind = draw(
        st.sampled_from(
            ["valid", "corrupt", "corrupt", "shape", "bytes", "mutated", "mutated", "wrong_id", "no_id", "bad_id"]
        )
    )
    if kind == "valid":
        payload = _pack(draw(valid_bodies(request_id)))
    elif kind == "corrupt":
        payload = _pack(draw(corrupted_bodies(request_id)))
    elif kind == "shape":
        payload = _pack(draw(st.dictionaries(st.sampled_from(FIELDS), values, max_size=12)))
    elif kind == "bytes":
        payload = draw(st.binary(max_size=512))
    elif kind == "mutated":
        edits = draw(
            st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=4)
        )
        payload = _mutate(_pack(draw(valid_bodies(request_id))), edits)
    elif kind == "wrong_id":
        payload = _pack(draw(valid_bodies(new_request_id())))
    else:
        payload = _pack(draw(valid_bodies(request_id)))
        if kind == "no_id":
            return {"m": payload}, None
        bad = draw(st.text(max_size=40).filter(lambda s: len(s) != 32) | st.just(request_id.upper()))
        return {"id": bad, "m": payload}, None
    return {"id": request_id, "m": payload}, request_id


def mutants(
    seeds: list[tuple[dict[str, bytes | str], str | None]], n: int, rng: random.Random
) -> list[tuple[dict[str, bytes | str], str | None]]:
    """n cheap descendants of hypothesis-drawn entries (hypothesis draws ~100 a second; this, ~100,000):
    a fresh request id written over the old one wherever it appears, then a few bytes damaged, half the time."""
    out: list[tuple[dict[str, bytes | str], str | None]] = []
    for _ in range(n):
        fields, old_id = rng.choice(seeds)
        if old_id is None:
            out.append((dict(fields), None))
            continue
        new_id = new_request_id()
        payload = bytes(fields["m"]).replace(old_id.encode(), new_id.encode())  # type: ignore[arg-type]
        if rng.random() < 0.5:
            edits = [(rng.randrange(4), rng.randrange(4096), rng.randrange(256)) for _ in range(rng.randint(1, 3))]
            payload = _mutate(payload, edits)
        out.append(({"id": new_id, "m": payload}, new_id))
    return out


def generate(n: int) -> list[tuple[dict[str, bytes | str], str | None]]:
    """n entries drawn by hypothesis (generation only: nothing to shrink, no example database)."""
    drawn: list[tuple[dict[str, bytes | str], str | None]] = []

    @settings(
        max_examples=n, database=None, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
    )
    @given(entries())
    def collect(entry: tuple[dict[str, bytes | str], str | None]) -> None:
        drawn.append(entry)

    collect()
    return drawn
