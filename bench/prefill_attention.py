"""Prefill attention on CPU: the C++ prefill kernel against SDPA, per sequence and in a whole engine step.

Part 1 ("sequences"): one float32 sequence of n new tokens (the default model's attention shape: 9
query heads over 3 kv heads, head size 64, block size 16, blocks shuffled) attended by SDPA
(kernels.torch_backend.attend_sequence: the cpu backend's fallback, with its gather when tokens are
cached) and by the kernel, interleaved in rounds. Fresh prompts of 32, 64, 128 and 256 tokens, and a
256-token chunk over 256 cached tokens (chunked prefill's continuation).

Part 2 ("step"): prefill steps of the default model, prompts of U[16,256] random tokens totalling
--step-tokens (2048: one full step), with the backend's prefill kernel on and off in alternate
rounds (fresh random prompts every round, so the prefix cache never hits). Reports the step's
wall time, the time inside attention (all layers' backend.forward: K/V write, decode kernel,
prefill kernel or SDPA) and the part of it the kernel replaces (long_chunks_ms: its calls, or
SDPA's per sequence).

Ratios are SDPA / kernel of medians from the same run. Prints one JSON object.

    python bench/prefill_attention.py [--threads 2] [--rounds 5] [--save]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.workloads import emit_report, machine_info  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
SEQUENCES = [(32, 32), (64, 64), (128, 128), (256, 256), (256, 512)]  # (new tokens, context length)


def _sequence(n: int, length: int) -> tuple[Any, ...]:
    """A one-sequence step over a shuffled paged cache, the step's K/V already in it (as forward has them)."""
    import torch

    from kernels.metadata import AttentionMetadata, KVLayer

    blocks = -(-length // BLOCK)
    table = list(range(blocks + 8))
    random.Random(length).shuffle(table)
    table = table[:blocks]
    shape = (blocks + 8, BLOCK, KV_HEADS, HEAD_DIM)
    layer = KVLayer(torch.randn(shape), torch.randn(shape))
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length - n, length)])
    key, value = torch.randn(n, KV_HEADS, HEAD_DIM), torch.randn(n, KV_HEADS, HEAD_DIM)
    layer.k.view(-1, KV_HEADS, HEAD_DIM)[slots] = key
    layer.v.view(-1, KV_HEADS, HEAD_DIM)[slots] = value
    meta = AttentionMetadata(slots, torch.tensor([table], dtype=torch.int32), [length], [n], [0], BLOCK, [layer])
    query = torch.randn(1, HEADS, n, HEAD_DIM).transpose(1, 2)[0]  # as the model hands it over
    return meta, layer, query, key, value


def _timed(fn: Callable[[], object], reps: int, into: list[float]) -> None:
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        into.append((time.perf_counter() - start) * 1000)


def _summary(sdpa: list[float], kernel: list[float]) -> dict[str, Any]:
    a, b = statistics.median(sdpa), statistics.median(kernel)
    return {
        "sdpa_ms_median": round(a, 4),
        "kernel_ms_median": round(b, 4),
        "sdpa_ms_min": round(min(sdpa), 4),
        "kernel_ms_min": round(min(kernel), 4),
        "speedup_median": round(a / b, 2),
        "speedup_min": round(min(sdpa) / min(kernel), 2),
    }


def measure_sequences(module: Any, rounds: int) -> list[dict[str, Any]]:  # noqa: ANN401
    import torch

    from kernels.torch_backend import attend_sequence

    results = []
    for n, length in SEQUENCES:
        meta, layer, query, key, value = _sequence(n, length)
        seqs = torch.tensor([[0, 0, n, length]])
        out_sdpa, out_kernel = torch.empty(query.shape), torch.empty(query.shape)
        run_sdpa = partial(attend_sequence, out_sdpa, query, key, value, layer, meta, 0, 0.125, None)
        run_kernel = partial(
            module.prefill_attention, out_kernel, query, layer.k, layer.v, seqs, meta.block_tables, 0.125
        )
        reps = max(5, 20_000 // n)  # ~the same time per length
        sdpa: list[float] = []
        kernel: list[float] = []
        for _ in range(rounds):
            _timed(run_sdpa, reps, sdpa)
            _timed(run_kernel, reps, kernel)
        error = (out_sdpa - out_kernel).abs().max().item()
        results.append({"new_tokens": n, "context": length, **_summary(sdpa, kernel), "max_abs_diff": error})
    return results


def measure_step(step_tokens: int, rounds: int, threads: int) -> dict[str, Any]:
    from engine import LLM, SamplingParams

    llm = LLM(model=None, num_threads=threads, max_num_seqs=256, max_num_batched_tokens=step_tokens)
    engine = llm.engine
    backend = engine.runner.backend
    totals = {"attention_ms": 0.0, "long_chunks_ms": 0.0}

    def timer(fn: Callable[..., Any], total: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[total] += (time.perf_counter() - start) * 1000

        return timed

    # attention_ms: all of backend.forward; long_chunks_ms: the part the kernel replaces (the kernel's
    # calls, or SDPA's per sequence with their gathers).
    import kernels.cpu_backend

    backend.forward = timer(backend.forward, "attention_ms")
    backend._prefill = timer(backend._prefill, "long_chunks_ms")
    kernels.cpu_backend.attend_sequence = timer(kernels.cpu_backend.attend_sequence, "long_chunks_ms")
    rng = random.Random(0)
    lengths: list[int] = []
    while sum(lengths) < step_tokens:
        lengths.append(min(rng.randint(16, 256), step_tokens - sum(lengths)))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    runs: dict[bool, dict[str, list[float]]] = {on: {"step_ms": [], **{k: [] for k in totals}} for on in (True, False)}
    for r in range(-1, rounds):  # round -1 warms both up
        for on in (True, False):
            backend.prefill_kernel = on
            ids = [f"r{r}-{on}-{i}" for i in range(len(lengths))]
            for rid, n in zip(ids, lengths, strict=True):
                engine.add_request(rid, [rng.randrange(engine.vocab_size) for _ in range(n)], params)
            totals.update(dict.fromkeys(totals, 0.0))
            start = time.perf_counter()
            engine.step()
            elapsed = (time.perf_counter() - start) * 1000
            pending = engine.scheduler.num_waiting or any(
                req.num_tokens - req.num_computed_tokens > 1 for _, req in engine.scheduler.running
            )
            assert not pending, "the prompts did not fit one step"
            for rid in ids:
                engine.abort(rid)
            if r >= 0:
                runs[on]["step_ms"].append(elapsed)
                for k, v in totals.items():
                    runs[on][k].append(v)
    backend.prefill_kernel = True
    med = {on: {k: statistics.median(v) for k, v in runs[on].items()} for on in runs}
    return {
        "attention_backend": engine.attention_backend,
        "prompts": len(lengths),
        "step_tokens": sum(lengths),
        "kernel": {k: round(v, 1) for k, v in med[True].items()},
        "sdpa": {k: round(v, 1) for k, v in med[False].items()},
        "long_chunks_speedup": round(med[False]["long_chunks_ms"] / med[True]["long_chunks_ms"], 2),
        "attention_speedup": round(med[False]["attention_ms"] / med[True]["attention_ms"], 2),
        "step_speedup": round(med[False]["step_ms"] / med[True]["step_ms"], 3),
        "runs": {("kernel" if on else "sdpa"): {k: [round(x) for x in v] for k, v in runs[on].items()} for on in runs},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step-tokens", type=int, default=2048)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    import torch

    from kernels import cpu_build

    torch.set_num_threads(args.threads)
    machine = machine_info(threads=args.threads)
    module = cpu_build.load()
    assert module is not None and HEAD_DIM in module.prefill_head_dims(), "no prefill kernel in this build"
    with torch.inference_mode():
        sequences = measure_sequences(module, args.rounds)
    step = measure_step(args.step_tokens, args.rounds, args.threads)
    report = {
        "benchmark": "prefill_attention",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK},
        "sequences": sequences,
        "step": step,
    }
    emit_report(report, "prefill-attention", args.save)


if __name__ == "__main__":
    main()
