"""One system of the engine benchmark, run in its own process: `python bench/engine_systems.py SYSTEM ...`.

Prints one JSON line: output tokens/s, TTFT per request, peak RSS, cold start. Each process
starts cold, so memory and start-up belong to the system measured and to nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, bench/ would come first on sys.path and bench/engine.py would shadow `engine`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import Request, mixed_workload, peak_rss_mb, uniform_workload  # noqa: E402

HF_STATIC_BATCH = 16


def _model_dir() -> str:
    from engine.models.default_model import default_model_dir

    return str(default_model_dir())


def run_tokenrelay(workload: list[Request], threads: int, spawned_at: float) -> dict[str, Any]:
    from engine import LLM, SamplingParams

    llm = LLM(model=None, num_threads=threads, max_num_seqs=64, max_num_batched_tokens=2048)
    engine = llm.engine
    engine.add_request("warm-up", [1, 2, 3, 4], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    first_token = None
    while engine.has_unfinished():
        if engine.step() and first_token is None:
            first_token = time.time()
    assert first_token is not None
    bs = engine.kv.block_size
    started = time.perf_counter()
    for i, (prompt, n) in enumerate(workload):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    ttft: dict[str, float] = {}
    tokens = slots_used = slots_allocated = steps = 0
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        steps += 1
        for out in outputs:
            tokens += len(out.new_token_ids)
            ttft.setdefault(out.request_id, now - started)
        for _, request in engine.scheduler.running:
            slots_used += request.num_computed_tokens
            slots_allocated += len(request.block_ids) * bs
    elapsed = time.perf_counter() - started
    stats = engine.stats()
    return {
        "output_tokens": tokens,
        "seconds": elapsed,
        "ttft_s": list(ttft.values()),
        "cold_start_s": first_token - spawned_at,
        "steps": steps,
        "kv_slots_used_fraction": slots_used / slots_allocated if slots_allocated else None,
        "preemptions": stats["preemptions"],
        "kv_blocks_total": stats["kv_blocks_total"],
        "attention_backend": engine.attention_backend,
    }


def _load_hf(threads: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(_model_dir(), dtype=torch.float32).eval()


def _first_token_stamp() -> Any:
    from transformers import LogitsProcessor

    class FirstTokenStamp(LogitsProcessor):
        """Called once per decoding step: the first call is when a batch's first tokens exist."""

        def __init__(self) -> None:
            self.at: float | None = None

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if self.at is None:
                self.at = time.perf_counter()
            return scores

    return FirstTokenStamp()


def _generate_padded(model: Any, prompts: list[list[int]], max_new_tokens: int) -> float:
    """transformers generate on one left-padded static batch; returns when its first tokens came."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    stamp = _first_token_stamp()
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(
            ids, attention_mask=mask, generation_config=config, logits_processor=LogitsProcessorList([stamp])
        )
    assert stamp.at is not None
    return stamp.at


def run_hf_static(workload: list[Request], threads: int, spawned_at: float) -> dict[str, Any]:
    model = _load_hf(threads)
    _generate_padded(model, [[1, 2, 3, 4]], 1)
    cold = time.time()
    started = time.perf_counter()
    ttft = []
    for i in range(0, len(workload), HF_STATIC_BATCH):
        batch = workload[i : i + HF_STATIC_BATCH]
        first = _generate_padded(model, [p for p, _ in batch], max(n for _, n in batch))
        ttft += [first - started] * len(batch)
    elapsed = time.perf_counter() - started
    # A static batch runs until its longest request is done; only each request's own tokens count.
    return {
        "output_tokens": sum(n for _, n in workload),
        "seconds": elapsed,
        "ttft_s": ttft,
        "cold_start_s": cold - spawned_at,
        "batch_size": HF_STATIC_BATCH,
    }


def run_hf_sequential(workload: list[Request], threads: int, spawned_at: float) -> dict[str, Any]:
    model = _load_hf(threads)
    _generate_padded(model, [[1, 2, 3, 4]], 1)
    cold = time.time()
    started = time.perf_counter()
    ttft = [_generate_padded(model, [prompt], n) - started for prompt, n in workload]
    return {
        "output_tokens": sum(n for _, n in workload),
        "seconds": time.perf_counter() - started,
        "ttft_s": ttft,
        "cold_start_s": cold - spawned_at,
    }


def run_hf_continuous(workload: list[Request], threads: int, spawned_at: float) -> dict[str, Any]:
    from transformers import GenerationConfig

    model = _load_hf(threads)
    config = GenerationConfig(
        max_new_tokens=max(n for _, n in workload), do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=30) as manager:
        manager.add_request([1, 2, 3, 4], request_id="warm-up", max_new_tokens=1, eos_token_id=-1)
        manager.get_result(request_id="warm-up", timeout=600)
        cold = time.time()
        started = time.perf_counter()
        for i, (prompt, n) in enumerate(workload):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, record_timestamps=True, eos_token_id=-1)
        results = {}
        while len(results) < len(workload):
            result = manager.get_result(timeout=600)
            if result is not None and result.is_finished():
                results[result.request_id] = result
        elapsed = time.perf_counter() - started
    tokens = sum(len(r.generated_tokens) for r in results.values())
    ttft = [r.timestamps[0] - started for r in results.values() if r.timestamps]
    errors = [r.error for r in results.values() if r.error]
    return {
        "output_tokens": tokens,
        "seconds": elapsed,
        "ttft_s": ttft,
        "cold_start_s": cold - spawned_at,
        "errors": errors[:3],
    }


SYSTEMS = {
    "tokenrelay": run_tokenrelay,
    "hf_static": run_hf_static,
    "hf_continuous": run_hf_continuous,
    "hf_sequential": run_hf_sequential,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--workload", choices=["mixed", "uniform"], default="mixed")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spawned-at", type=float, default=None)
    args = parser.parse_args()
    spawned_at = args.spawned_at or time.time()
    workload = mixed_workload(args.requests) if args.workload == "mixed" else uniform_workload(args.requests)
    result = SYSTEMS[args.system](workload, args.threads, spawned_at)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
