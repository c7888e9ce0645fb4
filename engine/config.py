"""Engine and sampling configuration: slotted dataclasses validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.structured.spec import (
    StructuredOutputs,
    check_allowed_token_ids,
    check_logit_bias,
    check_structured_outputs,
)

_DTYPES = ("auto", "float32", "float64", "float16", "bfloat16")
_BACKENDS = ("auto", "torch", "cpu", "xformers")
_PREEMPTION_MODES = ("auto", "recompute", "swap")
_QUANTIZATIONS = (None, "int8", "gguf")
_SPECULATIVE = (None, "ngram")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop, per request (names follow vLLM and the OpenAI API).

    The engine never modifies a SamplingParams: one instance may be shared by many requests.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives to return besides the sampled token
    prompt_logprobs: int | None = None  # score the prompt too (perplexity, OpenAI's echo): top alternatives
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # None: follow the engine's `speculative` setting; False: off for this request; True: on where the
    # engine has a proposer. Output is the same either way (greedy: token for token; sampled: in law).
    speculative: bool | None = None
    # Constraints (engine/structured/spec.py has their wire shapes); applied after the penalties,
    # in this order: logit_bias, allowed_token_ids, the grammar's mask, then min_tokens.
    structured_outputs: StructuredOutputs | None = None  # a mapping is accepted and converted
    logit_bias: dict[int, float] | None = None  # {token id: bias in [-100, 100]}
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        self.structured_outputs = check_structured_outputs(self.structured_outputs)
        self.logit_bias = check_logit_bias(self.logit_bias)
        self.allowed_token_ids = check_allowed_token_ids(self.allowed_token_ids)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            "max_tokens",
            f"must be an integer >= 1, got {self.max_tokens!r}",
        )
        _check(
            _is_number(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be a finite number >= 0, got {self.temperature!r}",
        )
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(
            _is_int(self.top_k) and self.top_k >= -1,
            "top_k",
            f"must be an integer >= -1 (0 or -1 disable it), got {self.top_k!r}",
        )
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            f"must be a finite number > 0, got {self.repetition_penalty!r}",
        )
        _check(
            _is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            f"must be in [-2, 2], got {self.presence_penalty!r}",
        )
        _check(
            _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            f"must be in [-2, 2], got {self.frequency_penalty!r}",
        )
        _check(self.seed is None or _is_int(self.seed), "seed", f"must be an integer or None, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(len(self.stop) <= 16, "stop", "at most 16 stop strings")
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative integers"
        )
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be an integer in [0, max_tokens], got {self.min_tokens!r}",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(
                value is None or (_is_int(value) and 0 <= value <= 20),
                name,
                f"must be None or an integer in [0, 20], got {value!r}",
            )
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, "must be a boolean")
        _check(
            self.speculative is None or isinstance(self.speculative, bool),
            "speculative",
            f"must be true, false or None, got {self.speculative!r}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def constrained(self) -> bool:
        """Whether sampling must go through the constraint code (engine/structured/constraint.py)."""
        return self.structured_outputs is not None or self.logit_bias is not None or self.allowed_token_ids is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (logit_bias keys become strings, as JSON has no other)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        if self.structured_outputs is not None:
            values["structured_outputs"] = self.structured_outputs.to_dict()
        if self.logit_bias is not None:
            values["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Build from a plain mapping, rejecting unknown names (a typo must not pass silently)."""
        unknown = set(values) - set(cls.__slots__)
        if unknown:
            raise ValueError(f"sampling params: unknown field(s) {sorted(unknown)}")
        return cls(**values)


@dataclass(slots=True)
class EngineConfig:
    """Everything that shapes one engine instance; printed once at start-up."""

    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA (float16 where bf16 is unsupported)
    device: str = "auto"  # auto: cuda when available, else cpu
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_memory_gb
    kv_cache_memory_gb: float | None = None  # None: a fraction of free memory, capped
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's own context length
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | torch | cpu | xformers
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    adaptive_threads: bool = True  # CPU: step on fewer threads while other processes hold the cores
    cpu_weight_packing: bool = True  # fp32 on CPU: prepack Linear weights for oneDNN
    host_memory_trim_s: float = 2.0  # CPU: hand the heap's free pages back to the OS this often (0: never)
    fused_layers: bool = True  # CPU, Llama/Mistral/Qwen2: merged projections and fused elementwise kernels
    seed: int = 0
    trust_remote_code: bool = False
    quantization: str | None = (
        None  # None | "int8" (weight-only, per channel) | "gguf" (the default model's Q4_1 blocks)
    )
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | int8 (per-token, per-head scales)
    swap_space_gb: float = 0.0  # host memory for preempted requests' K/V (0: always recompute)
    cpu_offload_gb: float = 0.0  # weights of this many GB of decoder layers stay in host memory
    preemption_mode: str = "auto"  # auto (cost model) | recompute | swap
    speculative: str | None = None  # None | "ngram" (prompt lookup: drafts copied from the request's own tokens)
    num_speculative_tokens: int = 4  # k: most draft tokens verified per request and step
    ngram_prompt_lookup_max: int = 4  # longest suffix n-gram looked up (vLLM's names)
    ngram_prompt_lookup_min: int = 2  # shortest one
    # Draft tokens per step, shared by the decodes that have drafts: a big batch is compute-bound and
    # every draft costs a row of compute, so with many decodes each gets fewer (none past this many).
    max_speculative_tokens_per_step: int = 32
    grammar_compile_timeout_s: float = 30.0  # a structured-output request whose grammar takes longer ends in error

    def __post_init__(self) -> None:
        _check(
            self.model is None or (isinstance(self.model, str) and self.model != ""),
            "model",
            "must be a non-empty path or None",
        )
        _check(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _check(
            isinstance(self.device, str) and self.device.split(":")[0] in ("auto", "cpu", "cuda"),
            "device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}",
        )
        _check(
            _is_int(self.block_size) and self.block_size in (8, 16, 32, 64, 128, 256),
            "block_size",
            f"must be one of 8..256 (a power of two), got {self.block_size!r}",
        )
        _check(
            self.num_kv_blocks is None or (_is_int(self.num_kv_blocks) and self.num_kv_blocks >= 2),
            "num_kv_blocks",
            f"must be an integer >= 2 or None, got {self.num_kv_blocks!r}",
        )
        _check(
            self.kv_cache_memory_gb is None or (_is_number(self.kv_cache_memory_gb) and self.kv_cache_memory_gb > 0),
            "kv_cache_memory_gb",
            "must be > 0 or None",
        )
        _check(
            _is_int(self.max_num_seqs) and self.max_num_seqs >= 1,
            "max_num_seqs",
            f"must be an integer >= 1, got {self.max_num_seqs!r}",
        )
        _check(
            _is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            f"must be an integer >= 1, got {self.max_num_batched_tokens!r}",
        )
        _check(
            self.max_model_len is None or (_is_int(self.max_model_len) and self.max_model_len >= 1),
            "max_model_len",
            "must be an integer >= 1 or None",
        )
        _check(
            self.attention_backend in _BACKENDS,
            "attention_backend",
            f"must be one of {_BACKENDS}, got {self.attention_backend!r}",
        )
        _check(
            self.num_threads is None or (_is_int(self.num_threads) and self.num_threads >= 1),
            "num_threads",
            "must be an integer >= 1 or None",
        )
        _check(
            _is_number(self.host_memory_trim_s) and self.host_memory_trim_s >= 0,
            "host_memory_trim_s",
            "must be a number of seconds >= 0",
        )
        _check(_is_number(self.swap_space_gb) and self.swap_space_gb >= 0, "swap_space_gb", "must be a number >= 0")
        _check(
            self.preemption_mode in _PREEMPTION_MODES,
            "preemption_mode",
            f"must be one of {_PREEMPTION_MODES}, got {self.preemption_mode!r}",
        )
        _check(
            self.preemption_mode != "swap" or self.swap_space_gb > 0,
            "preemption_mode",
            "'swap' needs swap_space_gb > 0",
        )
        _check(
            self.quantization in _QUANTIZATIONS,
            "quantization",
            f"must be one of {_QUANTIZATIONS}, got {self.quantization!r}",
        )
        _check(
            self.kv_cache_dtype in ("auto", "int8"),
            "kv_cache_dtype",
            f"must be auto or int8, got {self.kv_cache_dtype!r}",
        )
        _check(_is_number(self.cpu_offload_gb) and self.cpu_offload_gb >= 0, "cpu_offload_gb", "must be a number >= 0")
        _check(
            _is_number(self.grammar_compile_timeout_s) and self.grammar_compile_timeout_s > 0,
            "grammar_compile_timeout_s",
            "must be a number > 0",
        )
        _check(
            self.quantization != "gguf" or self.model is None,
            "quantization",
            "'gguf' computes from the default model's GGUF file; use model=None",
        )
        _check(
            self.speculative in _SPECULATIVE,
            "speculative",
            f"must be one of {_SPECULATIVE}, got {self.speculative!r}",
        )
        _check(
            _is_int(self.num_speculative_tokens) and 1 <= self.num_speculative_tokens <= 32,
            "num_speculative_tokens",
            f"must be an integer in [1, 32], got {self.num_speculative_tokens!r}",
        )
        _check(
            _is_int(self.max_speculative_tokens_per_step) and self.max_speculative_tokens_per_step >= 1,
            "max_speculative_tokens_per_step",
            f"must be an integer >= 1, got {self.max_speculative_tokens_per_step!r}",
        )
        _check(
            _is_int(self.ngram_prompt_lookup_min) and self.ngram_prompt_lookup_min >= 1,
            "ngram_prompt_lookup_min",
            f"must be an integer >= 1, got {self.ngram_prompt_lookup_min!r}",
        )
        _check(
            _is_int(self.ngram_prompt_lookup_max) and self.ngram_prompt_lookup_max >= self.ngram_prompt_lookup_min,
            "ngram_prompt_lookup_max",
            f"must be an integer >= ngram_prompt_lookup_min ({self.ngram_prompt_lookup_min!r}), "
            f"got {self.ngram_prompt_lookup_max!r}",
        )
