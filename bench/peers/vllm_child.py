"""vLLM's CPU build on the same workload, run by the peer's own python (see ../shared/peers/README.md).

Set up as our reference figures were: fp32, max_model_len 512, token-id prompts, greedy with
min_tokens = max_tokens and ignore_eos, one warm-up request, then every request in one generate call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench.workloads import mixed_workload, peak_rss_mb, uniform_workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--workload", choices=["mixed", "uniform"], default="mixed")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--spawned-at", type=float, required=True)
    args = parser.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    workload = mixed_workload(args.requests) if args.workload == "mixed" else uniform_workload(args.requests)
    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32", seed=0, max_model_len=512)

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)

    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3, 4])], params(1), use_tqdm=False)
    cold = time.time()
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in workload]
    started = time.perf_counter()
    outputs = llm.generate(prompts, [params(n) for _, n in workload], use_tqdm=False)
    elapsed = time.perf_counter() - started
    ttft = []
    for out in outputs:
        metrics = getattr(out, "metrics", None)
        first, arrival = getattr(metrics, "first_token_time", None), getattr(metrics, "arrival_time", None)
        if first and arrival:
            ttft.append(first - arrival)
    print(
        json.dumps(
            {
                "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                "seconds": elapsed,
                "ttft_s": ttft,
                "cold_start_s": cold - args.spawned_at,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


if __name__ == "__main__":
    main()
