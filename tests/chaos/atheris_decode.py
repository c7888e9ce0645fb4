"""atheris (libFuzzer) on the request decoder: `python -m tests.chaos.atheris_decode -runs=N [corpus dir]`.

Any exception other than ProtocolError is a crash; so is a request that decodes but does not survive
its own re-encoding. The corpus directory is seeded with valid requests so mutations start deep.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from producer.errors import ProtocolError
    from producer.params import validate_params  # noqa: F401 - instrumented: decode_request calls it
    from producer.protocol import Request, decode_request

SEEDS = [
    Request("a" * 32, "tiny", prompt="Write a poem about spring.", params={"max_tokens": 8, "temperature": 0.5}),
    Request(
        "b" * 32,
        "tiny",
        messages=[{"role": "user", "content": "Hi"}],
        params={"stop": ["x"], "seed": 3},
        metadata={"user": 42, "tags": [1, 2.5, None, b"x"]},
        deadline=2e9,
    ),
    Request("c" * 32, "tiny", prompt_token_ids=[1, 2, 3], params={"logprobs": 2, "top_k": 5}, stream=False),
]


def test_one_input(data: bytes) -> None:
    try:
        request = decode_request(data)
    except ProtocolError:
        return
    if decode_request(request.encode(), expected_id=request.request_id).encode() != request.encode():
        raise AssertionError(f"a decoded request does not survive re-encoding: {data!r}")


def main() -> None:
    corpus = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    for directory in corpus:
        for i, seed in enumerate(SEEDS):
            (Path(directory) / f"seed-{i}").write_bytes(seed.encode())
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
