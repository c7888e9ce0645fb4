"""WorkerSettings: every EngineConfig field reaches the worker as a flag and a variable, checked at start-up."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import EngineConfig
from producer.settings import options
from worker.cli import build_parser
from worker.settings import (
    ENGINE_FIELDS_EXCLUDED,
    ENGINE_OPTIONS,
    SERVING_MAX_NUM_BATCHED_TOKENS,
    SHARED_WITH_ENGINE,
    WORKER_FLAGS,
    WorkerSettings,
)


def _worker_flags() -> dict[str, str]:
    """dest -> flag of `tokenrelay worker`."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices["worker"]  # type: ignore[attr-defined]
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_engine_field_is_a_worker_flag_and_variable() -> None:
    flags = _worker_flags()
    readable = {o.name for o in options(WorkerSettings) if o.env} | {
        o.name for o in options(EngineConfig) if o.env and o.name in ENGINE_OPTIONS
    }
    assert all(reason for reason in ENGINE_FIELDS_EXCLUDED.values())
    for f in dataclasses.fields(EngineConfig):
        if f.name in ENGINE_FIELDS_EXCLUDED:
            continue
        assert f.name in flags, f"EngineConfig.{f.name} has no `tokenrelay worker` flag"
        assert f.name in readable, f"EngineConfig.{f.name} has no TOKENRELAY_{f.name.upper()} variable"
    assert flags["kv_cache_dtype"] == "--kv-cache-dtype" and flags["swap_space_gb"] == "--swap-space-gb"
    # the worker's own fields that the engine reads too, under the flags scripts and docs use
    assert set(SHARED_WITH_ENGINE) == {
        "model",
        "dtype",
        "max_num_seqs",
        "max_num_batched_tokens",
        "num_threads",
        "num_kv_blocks",
    }
    assert flags["num_threads"] == "--threads" and flags["redis_url"] == "--redis"
    assert all(flags[name] == flag for name, flag in WORKER_FLAGS.items())


def test_flags_and_variables_reach_the_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_KV_CACHE_DTYPE", "int8")
    monkeypatch.setenv("TOKENRELAY_ENABLE_PREFIX_CACHING", "no")
    monkeypatch.setenv("TOKENRELAY_MAX_MODEL_LEN", "512")
    monkeypatch.setenv("TOKENRELAY_QUANTIZATION", "int8")
    monkeypatch.setenv("TOKENRELAY_NUM_THREADS", "3")
    argv = [
        "worker",
        "--quantization",
        "none",
        "--swap-space-gb",
        "0.1",
        "--preemption-mode",
        "swap",
        "--fused-layers",
        "false",
        "--max-num-batched-tokens",
        "64",
        "--threads",
        "2",
        "--dtype",
        "float32",
    ]
    args = vars(build_parser().parse_args(argv))
    settings = WorkerSettings.from_env(**{k: v for k, v in args.items() if k != "command"})
    config = settings.engine_config()
    assert config.kv_cache_dtype == "int8" and config.enable_prefix_caching is False and config.max_model_len == 512
    assert config.quantization is None  # the flag's "none" beats the variable
    assert (config.swap_space_gb, config.preemption_mode, config.fused_layers) == (0.1, "swap", False)
    assert (config.max_num_batched_tokens, config.num_threads, config.dtype) == (64, 2, "float32")
    assert config.block_size == EngineConfig().block_size  # not given: the engine's default
    summary = settings.engine_summary()
    assert summary == {
        "engine": "llm",
        "dtype": "float32",
        "quantization": None,
        "kv_cache_dtype": "int8",
        "enable_prefix_caching": False,
        "max_model_len": 512,
        "swap_space_gb": 0.1,
        "preemption_mode": "swap",
        "fused_layers": False,
    }


def test_a_served_engine_takes_a_smaller_chunk_budget_than_the_offline_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # bench/scheduler_policy.py chose 512 for serving; LLM() and EngineConfig keep 2048 for offline batches
    assert WorkerSettings().engine_config().max_num_batched_tokens == SERVING_MAX_NUM_BATCHED_TOKENS == 512
    assert EngineConfig().max_num_batched_tokens == 2048
    assert _worker_flags()["max_num_batched_tokens"] == "--max-num-batched-tokens"
    monkeypatch.setenv("TOKENRELAY_MAX_NUM_BATCHED_TOKENS", "1024")
    assert WorkerSettings.from_env().engine_config().max_num_batched_tokens == 1024
    with pytest.raises(ValueError, match="max_num_batched_tokens: must be an integer >= 1, got 0"):
        WorkerSettings.from_env(max_num_batched_tokens=0)


def test_engine_config_errors_surface_when_the_settings_are_built() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype: must be auto or int8, got 'fp8'"):
        WorkerSettings.from_env(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="preemption_mode: 'swap' needs swap_space_gb > 0"):
        WorkerSettings.from_env(preemption_mode="swap")
    with pytest.raises(ValueError, match="not engine options a worker takes"):
        WorkerSettings(engine_options={"max_num_seqs": 3})


def test_the_consumer_name_is_never_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_CONSUMER", "shared")
    assert WorkerSettings.from_env().consumer != "shared"


def test_describe_masks_the_redis_password() -> None:
    described = WorkerSettings.from_env(redis_url="redis://worker:pw@redis:6379/0", quantization="int8").describe()
    assert described["redis_url"] == "redis://worker:***@redis:6379/0"
    assert described["engine_options"] == {"quantization": "int8"} and described["served_model"]
