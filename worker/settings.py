"""WorkerSettings: one settings object per worker process, from CLI flags and TOKENRELAY_* variables.

The engine's options are not listed here: every `EngineConfig` field (engine/config.py) that the
worker does not set itself becomes a flag and a variable of its own, so a field added there later is
served with no change here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig
from producer import settings as loader
from producer.protocol import DEFAULT_MODEL_NAME, DEFAULT_PREFIX, DEFAULT_RESULT_TTL_S, Keys, check_model_name
from producer.settings import setting

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
# A served engine's step budget (and prefill chunk), smaller than the offline engine's 2048: a prompt
# arriving mid-decode then stalls the running requests for a quarter of the time, which keeps their TPOT
# inside the SLO near saturation (bench/scheduler_policy.py: 1.10-1.20x the goodput of 2048 at 5 req/s
# on two cores, equal below saturation; README "Scheduler policy"). vLLM also picks a smaller budget for
# its server than for its offline class.
SERVING_MAX_NUM_BATCHED_TOKENS = 512
ENGINES = ("llm", "noop")

# EngineConfig fields a worker does not take, and why. None today: every field makes sense for a served model.
ENGINE_FIELDS_EXCLUDED: dict[str, str] = {}

# Flags whose names are shorter than their fields' (kept for scripts, compose files and docs that use them).
WORKER_FLAGS = {
    "redis_url": "--redis",
    "num_threads": "--threads",
    "heartbeat_s": "--heartbeat",
    "claim_idle_s": "--claim-idle",
    "drain_grace_s": "--drain-grace",
    "publish_interval_s": "--publish-interval",
    "noop_step_delay_s": "--noop-step-delay",
}

# Help for the engine's own options; one that is missing here still gets its flag, with a plain help line.
ENGINE_HELP = {
    "device": "auto (cuda when available, else cpu), cpu, cuda or cuda:N",
    "block_size": "tokens per KV-cache block (8..256, a power of two)",
    "kv_cache_memory_gb": "KV-cache budget in GB when --num-kv-blocks is not given (none: from free memory)",
    "max_model_len": "longest prompt + output served (none: the model's own context length)",
    "enable_prefix_caching": "reuse the KV blocks of shared prompt prefixes",
    "attention_backend": "auto, torch, cpu or xformers",
    "cpu_weight_packing": "fp32 on CPU: prepack Linear weights for oneDNN",
    "adaptive_threads": "CPU: step on fewer threads while other processes hold the cores",
    "host_memory_trim_s": "CPU: hand the heap's free pages back to the OS this often, in seconds (0: never)",
    "fused_layers": "CPU, Llama/Mistral/Qwen2: merged projections and fused elementwise kernels",
    "seed": "the sampler's seed for requests that set none",
    "trust_remote_code": "let transformers run the model folder's own code",
    "quantization": "none, int8 (weight-only, per channel) or gguf (the default model's Q4_1 blocks)",
    "kv_cache_dtype": "auto (the model's dtype) or int8 (per-token, per-head scales)",
    "swap_space_gb": "host memory for preempted requests' K/V (0: always recompute)",
    "cpu_offload_gb": "keep this many GB of decoder layers in host memory",
    "preemption_mode": "auto (cost model), recompute or swap (needs --swap-space-gb)",
    "speculative": "none, or ngram: lossless speculative decoding from the request's own n-grams",
    "num_speculative_tokens": "--speculative: most draft tokens verified per request and step",
    "ngram_prompt_lookup_max": "--speculative ngram: longest n-gram looked up",
    "ngram_prompt_lookup_min": "--speculative ngram: shortest n-gram looked up",
    "max_speculative_tokens_per_step": "--speculative: draft tokens per step, shared by the decodes that have drafts",
    "grammar_compile_timeout_s": "seconds a structured output's grammar may take to compile before its request fails",
}


def _consumer_name() -> str:
    # unique per process: a restarted worker must not inherit a dead one's pending entries by name
    return f"{socket.gethostname()[:32]}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(slots=True)
class WorkerSettings:
    redis_url: str = setting(DEFAULT_REDIS_URL, help="Redis URL")
    prefix: str = setting(DEFAULT_PREFIX, help="key prefix")
    model: str | None = setting(None, help="local HF model folder (default: the packaged SmolLM2-135M-Instruct)")
    model_name: str | None = setting(None, help="the name clients address (default: the folder's name)")
    engine: str = setting("llm", help="llm, or noop: one token per request per step and no model (load tests)")
    dtype: str = setting("auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float64, float16 or bfloat16")
    max_num_seqs: int = setting(64, help="requests served at once")
    max_num_batched_tokens: int = setting(
        SERVING_MAX_NUM_BATCHED_TOKENS, help="token budget of one step (the prefill chunk size)"
    )
    num_threads: int | None = setting(None, help="torch intra-op threads")
    num_kv_blocks: int | None = setting(None, help="KV-cache blocks (default: from --kv-cache-memory-gb)")
    noop_step_delay_s: float = setting(0.0, help="--engine noop: seconds each step takes")
    partitions: int = setting(
        1, help="request streams per model, each its own Redis Cluster slot (producers must use the same number)"
    )
    heartbeat_s: float = setting(1.0, help="seconds between claim refreshes and heartbeats")
    claim_idle_s: float = setting(10.0, help="seconds before a silent worker's requests are taken over")
    max_deliveries: int = setting(3, help="claims of one request before it is dead-lettered")
    drain_grace_s: float = setting(30.0, help="SIGTERM: seconds to finish in-flight work before handing it back")
    publish_interval_s: float = setting(
        0.0, help="minimum seconds between publish round trips (0: one per step, coalesced)"
    )
    result_ttl_s: int = setting(DEFAULT_RESULT_TTL_S, help="seconds a finished request's result stream is kept")
    dead_letter_maxlen: int = setting(10_000, help="entries kept in a model's dead-letter stream")
    metrics_port: int = setting(0, help="serve Prometheus metrics on this port (0: off)")
    metrics_host: str = setting("0.0.0.0", help="address the metrics server listens on")  # noqa: S104 - scraped
    # Read from neither: each process names itself, and the engine's options arrive by their own names.
    consumer: str = setting(default_factory=_consumer_name, env=False, flag=False)
    engine_options: dict[str, Any] = setting(default_factory=dict, env=False, flag=False)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine: must be one of {ENGINES}, got {self.engine!r}")
        if self.model_name is not None:
            check_model_name(self.model_name)
        for name in ("heartbeat_s", "claim_idle_s", "drain_grace_s", "result_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        if self.claim_idle_s < 2 * self.heartbeat_s:
            raise ValueError("claim_idle_s: must be at least twice heartbeat_s, or live workers lose their work")
        if self.max_deliveries < 1 or self.max_num_seqs < 1:
            raise ValueError("max_deliveries and max_num_seqs: must be >= 1")
        unknown = set(self.engine_options) - set(ENGINE_OPTIONS)
        if unknown:
            raise ValueError(f"engine_options: not engine options a worker takes: {sorted(unknown)}")
        self.engine_config()  # EngineConfig's own checks, at start-up rather than after the model loads

    @property
    def served_model(self) -> str:
        if self.model_name:
            return self.model_name
        if self.engine == "noop":
            return "noop"
        if self.model is None:
            return DEFAULT_MODEL_NAME
        return os.path.basename(os.path.normpath(self.model))

    @property
    def keys(self) -> Keys:
        return Keys(self.served_model, self.prefix)

    def engine_config(self) -> EngineConfig:
        """The engine this worker serves: the fields it shares with EngineConfig, then the engine options."""
        return EngineConfig(**{name: getattr(self, name) for name in SHARED_WITH_ENGINE}, **self.engine_options)

    def engine_summary(self) -> dict[str, Any]:
        """For heartbeats (so `tokenrelay status` and /v1/models): the engine, its weight and KV formats,
        and every engine option set to something other than its default."""
        if self.engine == "noop":
            return {"engine": "noop"}
        config, defaults = self.engine_config(), EngineConfig()
        summary = {
            "engine": self.engine,
            "dtype": config.dtype,
            "quantization": config.quantization,
            "kv_cache_dtype": config.kv_cache_dtype,
        }
        summary.update({k: v for k, v in self.engine_options.items() if v != getattr(defaults, k)})
        return summary

    @classmethod
    def from_env(cls, **overrides: Any) -> WorkerSettings:
        """Defaults, then TOKENRELAY_<FIELD> variables, then explicit overrides (CLI flags; None: not given).
        Engine options are read by their EngineConfig names (`kv_cache_dtype`, TOKENRELAY_KV_CACHE_DTYPE)."""
        engine_overrides = {name: overrides.pop(name) for name in ENGINE_OPTIONS if name in overrides}
        values = loader.read(cls, overrides)
        values["engine_options"] = {
            **loader.read(EngineConfig, engine_overrides, only=ENGINE_OPTIONS),
            **values.get("engine_options", {}),
        }
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        """For the start-up log line: everything set, with any Redis password masked."""
        return {**loader.describe(self), "served_model": self.served_model}


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    """The worker's flags, then the engine's, each derived from its dataclass."""
    loader.add_flags(parser, WorkerSettings, flags=WORKER_FLAGS)
    engine = parser.add_argument_group(
        "engine options", "EngineConfig fields (engine/config.py); booleans take true/false, 1/0 or yes/no"
    )
    loader.add_flags(engine, EngineConfig, helps=ENGINE_HELP, only=ENGINE_OPTIONS)


_WORKER_FIELDS = {f.name for f in dataclasses.fields(WorkerSettings)}
# The engine reads these from the worker's own fields (the no-op engine and the heartbeat use them too).
SHARED_WITH_ENGINE = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name in _WORKER_FIELDS)
# The rest of EngineConfig: a flag and a TOKENRELAY_* variable each.
ENGINE_OPTIONS = tuple(
    f.name
    for f in dataclasses.fields(EngineConfig)
    if f.name not in _WORKER_FIELDS and f.name not in ENGINE_FIELDS_EXCLUDED
)
