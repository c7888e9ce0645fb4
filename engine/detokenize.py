"""Incremental detokenisation that never emits half a UTF-8 character, and stop strings."""

from __future__ import annotations

from typing import Any

# Tokens of context kept before the first output token, so a leading space decodes correctly.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a request's output tokens into text as they arrive.

    Text is held back while it could still be the start of a stop string, so a streaming
    consumer never sees text that a stop string later removes.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._emitted = 0
        self._hold_back = max((len(s) for s in stop), default=1) - 1
        context = prompt_token_ids[-_CONTEXT_TOKENS:]
        backend = getattr(tokenizer, "_tokenizer", None)
        self._stream = None
        if backend is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
                self._backend = backend
            except (ImportError, TypeError):
                self._stream = None
        # Fallback (slow tokenizers): decode a sliding window and keep what is complete.
        self._ids = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string it completed, if any (text is cut there)."""
        start = len(self.text)
        self.text += self._decode_next(token_id)
        if not self.stop or len(self.text) == start:
            return None
        # A stop string may straddle the previous text: search from a little before the new piece.
        search_from = max(0, start - self._hold_back)
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[: at + len(stop)] if self.include_stop else self.text[:at]
                return stop
        return None

    def take_new_text(self, finished: bool) -> str:
        """Text not handed out yet; while running, what might still turn into a stop string stays back."""
        end = len(self.text) if finished or not self.stop else max(self._emitted, len(self.text) - self._hold_back)
        new = self.text[self._emitted : end]
        self._emitted = end
        return new

    def _decode_next(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        self._ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self.skip_special_tokens
        )
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""
