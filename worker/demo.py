"""The demo: the default model streams four prompts at once to the terminal."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time

DEMO_PROMPTS = [
    "Explain the benefits of AI in healthcare.",
    "Write a poem about spring.",
    "Summarize the latest AI research trends.",
    "Describe how a message queue helps a web service stay responsive.",
]
_COLORS = ["\x1b[36m", "\x1b[33m", "\x1b[35m", "\x1b[32m"]
_RESET = "\x1b[0m"


class Panes:
    """Shows several token streams side by side: redrawn in place on a terminal, tagged lines otherwise."""

    def __init__(self, titles: list[str], stream: "object" = sys.stdout) -> None:
        self.titles = titles
        self.texts = ["" for _ in titles]
        self.out = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._drawn_lines = 0
        self._last_draw = 0.0

    def add(self, index: int, text: str) -> None:
        if not text:
            return
        self.texts[index] += text
        if self.tty:
            if time.monotonic() - self._last_draw > 0.05:
                self.draw()
        else:
            self.out.write(f"[{index + 1}] {text!r}\n")  # type: ignore[attr-defined]
            self.out.flush()  # type: ignore[attr-defined]

    def draw(self) -> None:
        width = max(40, shutil.get_terminal_size().columns - 2)
        lines: list[str] = []
        for i, (title, text) in enumerate(zip(self.titles, self.texts, strict=True)):
            lines.append(f"{_COLORS[i % len(_COLORS)]}[{i + 1}] {title}{_RESET}")
            body = " ".join(text.split())
            lines.extend("    " + body[j : j + width - 4] for j in range(0, len(body), width - 4))
            lines.append("")
        if self._drawn_lines:
            self.out.write(f"\x1b[{self._drawn_lines}F\x1b[J")  # type: ignore[attr-defined]
        self.out.write("\n".join(lines) + "\n")  # type: ignore[attr-defined]
        self.out.flush()  # type: ignore[attr-defined]
        self._drawn_lines = len(lines)
        self._last_draw = time.monotonic()


async def _demo_in_process(max_tokens: int) -> None:
    from engine import AsyncLLM, SamplingParams

    llm = AsyncLLM(model=None)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=0)
    tokenizer = llm.tokenizer
    panes = Panes(DEMO_PROMPTS)
    started = time.monotonic()
    counts = [0] * len(DEMO_PROMPTS)

    async def run(i: int, prompt: str) -> None:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        async for delta in llm.stream(chat, params):
            counts[i] += len(delta.new_token_ids)
            panes.add(i, delta.new_text)

    await asyncio.gather(*(run(i, p) for i, p in enumerate(DEMO_PROMPTS)))
    if panes.tty:
        panes.draw()
    elapsed = time.monotonic() - started
    print(f"\n{sum(counts)} tokens from {len(DEMO_PROMPTS)} concurrent requests in {elapsed:.1f} s "
          f"({sum(counts) / elapsed:.1f} tokens/s)")
    llm.shutdown()


def run_demo(max_tokens: int = 96) -> int:
    asyncio.run(_demo_in_process(max_tokens))
    return 0
