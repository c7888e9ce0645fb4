"""Speculative decoding benchmark: n-gram prompt lookup against our own plain decode, in one run.

Copying workload: the default model (SmolLM2-135M-Instruct, real weights, fp32) asked to repeat,
correct or continue passages of bench/data/prose.txt (chat template, greedy, EOS honoured), at 1,
4 and 16 requests in flight (a closed loop: a finished request is replaced at once). Random
workload: bench/workloads.py's "mixed" (random token ids; nothing to copy), where speculation
must switch itself off. Each case runs plain and speculative in the same engine (the plain runs
set `SamplingParams.speculative=False`), alternating which goes first over rounds, with the
prefix cache cleared before every run. Greedy outputs must be identical; the report says so.

    python bench/speculative.py            # 2 rounds, about 8 minutes on two busy cores
    python bench/speculative.py --quick    # 1 round, short outputs, about 2 minutes
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, bench/ would come first on sys.path and bench/engine.py would shadow `engine`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.workloads import emit_report, machine_info, mixed_workload  # noqa: E402

TARGETS = {"speedup_at_1_and_4": 1.5, "random_cost": 0.03}
TASKS = (
    "Repeat the following text exactly, word for word:\n\n{passage}",
    "Correct the spelling mistakes in the following text and write it out again in full:\n\n{passage}",
    "Here is the beginning of a document. Write it out again and then continue it:\n\n{passage}",
)


def passages(min_chars: int = 450, max_chars: int = 900) -> list[str]:
    """Consecutive paragraphs of prose.txt grouped into passages of roughly min..max characters."""
    paragraphs = [p.strip() for p in (ROOT / "bench/data/prose.txt").read_text().split("\n\n") if p.strip()]
    out, current = [], ""
    for paragraph in paragraphs:
        if current and len(current) + len(paragraph) > max_chars:
            if len(current) >= min_chars:
                out.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if len(current) >= min_chars:
        out.append(current)
    return out


def add_typos(text: str, rng: random.Random, rate: float = 0.06) -> str:
    """Swap two inner letters of about `rate` of the words (what the "correct" task fixes)."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) > 4 and word.isalpha() and rng.random() < rate:
            j = rng.randrange(1, len(word) - 2)
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def copy_prompts(tokenizer: Any, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    texts = passages()
    prompts = []
    for i in range(count):
        task = TASKS[i % len(TASKS)]
        passage = texts[(i * 7) % len(texts)]
        passage = add_typos(passage, rng) if "Correct" in task else passage
        messages = [{"role": "user", "content": task.format(passage=passage)}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def run_closed_loop(
    engine: Any, prompts: list[list[int]], max_tokens: list[int], concurrency: int, speculative: bool, ignore_eos: bool
) -> dict[str, Any]:
    """Keep `concurrency` requests in flight until all have finished; tokens/s over the whole run."""
    from engine import SamplingParams

    engine.kv.pool.reset_prefix_cache()  # the other mode's run must not warm this one's prompts
    before = engine.stats()
    pending = list(enumerate(zip(prompts, max_tokens, strict=True)))
    outputs: dict[int, list[int]] = {}
    in_flight = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, (prompt, n) = pending.pop(0)
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=ignore_eos, speculative=speculative)
            engine.add_request(f"{'spec' if speculative else 'plain'}-{i}", prompt, params)
            in_flight += 1
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id.split("-")[1])] = out.token_ids
                in_flight -= 1
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    after = engine.stats()
    proposed = after.get("spec_proposed_tokens", 0) - before.get("spec_proposed_tokens", 0)
    accepted = after.get("spec_accepted_tokens", 0) - before.get("spec_accepted_tokens", 0)
    tokens = sum(len(t) for t in outputs.values())
    return {
        "output_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        # CPU time is less hurt than wall time by other processes on the cores (it misses cache and
        # bandwidth contention): a second view of the same run on a shared machine.
        "tokens_per_cpu_s": tokens / cpu_seconds,
        "proposed": proposed,
        "accepted": accepted,
        "outputs": [outputs[i] for i in range(len(prompts))],
    }


def compare(
    engine: Any,
    prompts: list[list[int]],
    max_tokens: list[int],
    concurrency: int,
    rounds: int,
    ignore_eos: bool,
) -> dict[str, Any]:
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for round_index in range(rounds):
        for speculative in (False, True) if round_index % 2 == 0 else (True, False):
            runs[speculative].append(run_closed_loop(engine, prompts, max_tokens, concurrency, speculative, ignore_eos))
            last = runs[speculative][-1]
            print(
                f"  concurrency {concurrency} {'spec ' if speculative else 'plain'}: "
                f"{last['tokens_per_s']:.1f} tok/s, accepted {last['accepted']}/{last['proposed']}",
                file=sys.stderr,
                flush=True,
            )
    plain = statistics.median(r["tokens_per_s"] for r in runs[False])
    spec = statistics.median(r["tokens_per_s"] for r in runs[True])
    plain_cpu = statistics.median(r["tokens_per_cpu_s"] for r in runs[False])
    spec_cpu = statistics.median(r["tokens_per_cpu_s"] for r in runs[True])
    proposed = sum(r["proposed"] for r in runs[True])
    accepted = sum(r["accepted"] for r in runs[True])
    identical = all(r["outputs"] == runs[False][0]["outputs"] for r in runs[False] + runs[True])
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "output_tokens": runs[False][0]["output_tokens"],
        "plain_tokens_per_s": round(plain, 2),
        "speculative_tokens_per_s": round(spec, 2),
        "speedup": round(spec / plain, 3),
        "speedup_by_cpu_time": round(spec_cpu / plain_cpu, 3),
        "plain_runs": [round(r["tokens_per_s"], 2) for r in runs[False]],
        "speculative_runs": [round(r["tokens_per_s"], 2) for r in runs[True]],
        "proposed_tokens": proposed,
        "accepted_tokens": accepted,
        "acceptance_rate": round(accepted / proposed, 3) if proposed else 0.0,
        "greedy_outputs_identical": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, short outputs, fewer requests")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results/")
    parser.add_argument(
        "--random-only",
        action="store_true",
        help="only the random mixed workload (speculation's cost when it cannot help)",
    )
    parser.add_argument("--random-requests", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 2)
    max_new = 48 if args.quick else 128
    # requests per concurrency level: enough for the closed loop to stay full most of the run
    levels = {1: 1, 4: 4, 16: 16} if args.quick else {1: 3, 4: 8, 16: 16}
    num_random = args.random_requests or (8 if args.quick else 32)
    if args.random_only:
        levels = {}

    from engine import LLM

    started = time.perf_counter()
    llm = LLM(
        model=None,
        num_threads=args.threads,
        max_num_seqs=64,
        kv_cache_memory_gb=0.6,
        speculative="ngram",
        num_speculative_tokens=args.k,
    )
    engine = llm.engine
    all_prompts = copy_prompts(llm.tokenizer, max(levels.values(), default=1))
    prompt_lengths = [len(p) for p in all_prompts]
    copy_results = []
    for concurrency, count in levels.items():
        print(f"copying workload, {concurrency} in flight ...", file=sys.stderr, flush=True)
        copy_results.append(
            compare(engine, all_prompts[:count], [max_new] * count, concurrency, rounds, ignore_eos=False)
        )
    print("random mixed workload ...", file=sys.stderr, flush=True)
    workload = mixed_workload(num_requests=num_random)
    random_result = compare(
        engine, [p for p, _ in workload], [n for _, n in workload], num_random, rounds, ignore_eos=True
    )
    random_result["cost"] = round(1 - random_result["speedup"], 4)
    random_result["cost_by_cpu_time"] = round(1 - random_result["speedup_by_cpu_time"], 4)
    speedups = {r["concurrency"]: r["speedup"] for r in copy_results}
    report = {
        "benchmark": "speculative",
        "quick": args.quick,
        "rounds": rounds,
        "threads": args.threads,
        "num_speculative_tokens": args.k,
        "ngram_prompt_lookup": [engine.config.ngram_prompt_lookup_min, engine.config.ngram_prompt_lookup_max],
        "max_new_tokens": max_new,
        "prompt_tokens": {"min": min(prompt_lengths), "max": max(prompt_lengths)},
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "copying": copy_results,
        "random_mixed": random_result,
        "targets_met": {
            "speedup >= 1.5 at 1 and 4 in flight": all(speedups[c] >= TARGETS["speedup_at_1_and_4"] for c in (1, 4))
            if speedups
            else None,
            "random workload cost <= 3 %": random_result["cost"] <= TARGETS["random_cost"],
            "greedy outputs identical": all(r["greedy_outputs_identical"] for r in [*copy_results, random_result]),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    emit_report(report, "speculative", save=not args.no_save)


if __name__ == "__main__":
    main()
