"""All GPU checks in one run, for a session that is lent a CUDA machine (see the device tool's README).

1. The CUDA tests (`pytest -m cuda`): xformers attention against the torch backend on the device.
2. Greedy parity on the default model: xformers backend (paged decodes with 64-token pages, and
   gathered with 16-token pages) against the torch backend, bf16, same prompts.
3. Throughput of the mixed workload (64 requests) per backend and page size.

Prints one JSON object and writes it to $OUT/gpu_check.json when OUT is set (else bench/results/).
Not run in this project's CI: CI has no GPU.

    python bench/gpu_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # bench/engine.py shadows engine
sys.path.insert(0, str(ROOT))

from bench.workloads import mixed_workload  # noqa: E402


def cuda_tests() -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/kernels"], cwd=ROOT, capture_output=True, text=True
    )
    return {"exit_code": proc.returncode, "tail": proc.stdout[-1500:]}


def run_engine(
    backend: str, block_size: int, prompts: list[list[int]], workload: list[tuple[list[int], int]]
) -> dict[str, Any]:
    import torch

    from engine import LLM, SamplingParams

    llm = LLM(model=None, device="cuda", dtype="bfloat16", attention_backend=backend, block_size=block_size)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    torch.cuda.synchronize()
    started = time.perf_counter()
    outs = llm.generate(
        [p for p, _ in workload], [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in workload]
    )
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    result = {
        "backend": llm.engine.attention_backend,
        "block_size": block_size,
        "tokens_per_s": sum(len(o.token_ids) for o in outs) / elapsed,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
        "greedy": [o.token_ids for o in greedy],
    }
    del llm
    torch.cuda.empty_cache()
    return result


def main() -> None:
    import torch

    report: dict[str, Any] = {"benchmark": "gpu_check", "when": datetime.now().isoformat(timespec="seconds")}
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device"
        print(json.dumps(report))
        return
    report["device"] = torch.cuda.get_device_name()
    report["torch"] = torch.__version__
    try:
        import xformers

        report["xformers"] = xformers.__version__
    except ImportError:
        report["xformers"] = None
    report["cuda_tests"] = cuda_tests()
    prompts = [p[:64] for p, _ in mixed_workload(16, seed=1)]
    workload = mixed_workload(64)
    runs = [
        run_engine(backend, bs, prompts, workload)
        for backend, bs in (("torch", 16), ("xformers", 64), ("xformers", 16))
    ]
    reference = runs[0].pop("greedy")
    for run in runs[1:]:
        got = run.pop("greedy")
        run["greedy_exact_match_vs_torch"] = sum(a == b for a, b in zip(reference, got, strict=True)) / len(got)
        run["tokens_per_s_vs_torch"] = run["tokens_per_s"] / runs[0]["tokens_per_s"]
    report["engine"] = runs
    text = json.dumps(report, indent=2)
    print(text)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
