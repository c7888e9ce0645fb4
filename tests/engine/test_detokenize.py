"""Incremental detokenisation: whole characters only, byte by byte, and stop strings cut cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.detokenize import IncrementalDetokenizer

TEXT = "Spring 🌸 arrives: 春が来た, 봄이 왔다 — naïve café 😀👍🏽!"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(default_model_dir)


def _stream(
    tokenizer, token_ids: list[int], stop: list[str] | None = None, prompt: list[int] | None = None, slow: bool = False
) -> tuple[list[str], str, str | None]:
    detok = IncrementalDetokenizer(tokenizer, prompt or [], stop or [])
    if slow:
        detok._stream = None  # exercise the window-decoding fallback used for slow tokenizers
    pieces, hit = [], None
    for token_id in token_ids:
        hit = detok.add_token(token_id)
        pieces.append(detok.take_new_text(finished=hit is not None))
        if hit:
            break
    else:
        pieces.append(detok.take_new_text(finished=True))
    return pieces, detok.text, hit


@pytest.mark.parametrize("slow", [False, True])
def test_emoji_and_cjk_streamed_byte_by_byte(tokenizer, slow: bool) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # Multi-byte characters really are split across tokens here (else the test would prove nothing).
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces, text, _ = _stream(tokenizer, ids, slow=slow)
    assert "".join(pieces) == TEXT == text
    assert all("\ufffd" not in p for p in pieces)
    pieces[-1].encode("utf-8")  # every piece is valid on its own
    for piece in pieces:
        piece.encode("utf-8")


def test_leading_space_after_the_prompt(tokenizer) -> None:
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    ids = tokenizer.encode("The capital of France is Paris", add_special_tokens=False)[len(prompt) :]
    _, text, _ = _stream(tokenizer, ids, prompt=prompt)
    assert text == " Paris"


def test_stop_string_is_cut_and_never_streamed(tokenizer) -> None:
    ids = tokenizer.encode("one two three STOP four five", add_special_tokens=False)
    pieces, text, hit = _stream(tokenizer, ids, stop=["STOP"])
    assert hit == "STOP"
    assert text == "one two three "
    assert "".join(pieces) == text
    assert not any("ST" in p for p in pieces)


def test_stop_string_spanning_tokens(tokenizer) -> None:
    ids = tokenizer.encode("alpha<|end|>beta", add_special_tokens=False)
    _, text, hit = _stream(tokenizer, ids, stop=["<|end|>"])
    assert hit == "<|end|>" and text == "alpha"


def test_include_stop_string(tokenizer) -> None:
    ids = tokenizer.encode("a b c. d e", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], ["."], include_stop_str_in_output=True)
    for i in ids:
        if detok.add_token(i):
            break
    assert detok.text == "a b c."
