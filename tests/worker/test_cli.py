"""The `tokenrelay` command: submit and status work against a live worker, without importing torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.queue_helpers import WorkerThread
from worker.cli import build_parser
from worker.noop_engine import NoopEngine
from worker.settings import WorkerSettings


def _tokenrelay(*args: str) -> subprocess.CompletedProcess[str]:
    # -X importtime would be noisy; instead the child asserts torch never loaded.
    code = (
        "import sys; from worker.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_submit_streams_the_answer_and_status_lists_the_worker(redis_url: str) -> None:
    with WorkerThread(NoopEngine(), redis_url, model_name="noop", max_num_seqs=5):
        submitted = _tokenrelay("submit", "a b c", "--redis", redis_url, "--model", "noop", "--max-tokens", "4")
        status = _tokenrelay("status", "--redis", redis_url, "--json")
        text = _tokenrelay("status", "--redis", redis_url)
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout == " x x x x\n"
    assert '"finish_reason": "length"' in submitted.stderr
    assert status.returncode == 0, status.stderr
    (model,) = json.loads(status.stdout)
    assert model["model"] == "noop" and model["queued"] == {"high": 0, "normal": 0, "low": 0}
    assert len(model["workers"]) == 1 and model["workers"][0]["slots_total"] == 5
    assert "model noop" in text.stdout and "slots 0/5" in text.stdout


def test_submit_reports_a_refused_request(redis_url: str) -> None:
    result = _tokenrelay("submit", "x", "--redis", redis_url, "--temperature", "-1")
    assert result.returncode == 1 and "temperature" in result.stderr


def test_worker_flags_and_environment_build_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_REDIS_URL", "redis://example:1/2")
    monkeypatch.setenv("TOKENRELAY_MAX_NUM_SEQS", "9")
    args = vars(build_parser().parse_args(["worker", "--engine", "noop", "--claim-idle", "5", "--heartbeat", "1"]))
    settings = WorkerSettings.from_env(**{k: v for k, v in args.items() if k != "command"})
    assert (settings.redis_url, settings.max_num_seqs, settings.claim_idle_s) == ("redis://example:1/2", 9, 5.0)
    assert settings.served_model == "noop"
    with pytest.raises(ValueError, match="claim_idle_s"):
        WorkerSettings(heartbeat_s=2.0, claim_idle_s=3.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-cache-dtype", "fp8"], "kv_cache_dtype: must be auto or int8, got 'fp8'"),
        (["--preemption-mode", "swap"], "preemption_mode: 'swap' needs swap_space_gb > 0"),
        (["--enable-prefix-caching", "maybe"], "argument --enable-prefix-caching: expected true/false, 1/0 or yes/no"),
    ],
)
def test_an_invalid_engine_option_is_a_usage_error_before_torch_loads(args: list[str], message: str) -> None:
    code = (
        "import sys; from worker.cli import main\n"
        "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as exc:\n    rc = exc.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code, "worker", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_the_readme_lists_the_worker_flags_as_they_are() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Running a worker") : readme.index("### Submitting from Python")]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    worker = sub.choices["worker"]  # type: ignore[attr-defined]
    listed = set(re.findall(r"^\| `(--[a-z-]+)[^`]*` \| `(TOKENRELAY_\w+)`", section, re.MULTILINE))
    flags = set()
    for action in worker._actions:
        if action.option_strings and action.dest != "help":
            flags.add((action.option_strings[0], re.search(r"env (TOKENRELAY_\w+)", action.help).group(1)))
    assert listed == flags
