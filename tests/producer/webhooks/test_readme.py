"""The README's table of webhook flags is the gateway parser's, flag for flag."""

from __future__ import annotations

import re
from pathlib import Path

from worker.cli import build_parser


def test_the_readme_lists_the_webhook_flags_as_they_are() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme[readme.index("### Webhooks") : readme.index("### Bulk jobs")]
    listed = set(re.findall(r"^\| `(--[a-z-]+)` \| `(TOKENRELAY_\w+)`", section, re.MULTILINE))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    serve = sub.choices["serve"]  # type: ignore[attr-defined]
    flags = set()
    for action in serve._actions:
        if action.option_strings and action.option_strings[0].startswith("--webhook-"):
            flags.add((action.option_strings[0], re.search(r"env (TOKENRELAY_\w+)", action.help).group(1)))
    assert listed == flags and len(flags) == 6
