"""docs/RELIABILITY.md from bench/reliability.py's figures: what was tried, what held, what broke and was fixed."""

from __future__ import annotations

import statistics
from typing import Any

FIXED = [  # found by this suite; each fix has a test that fails without it
    (
        "0b50b52",
        "A publish whose reply was lost (Redis ran it; the connection died before the answer) was retried "
        "merged with newer tokens under the same seq, and the script skipped the lot: clients missed tokens (211 of "
        "3,000 requests under repeated connection cuts). The failed batch is now retried verbatim.",
    ),
    (
        "66fedcd",
        "After a Redis pause past the claim threshold a worker took its own idle entries back (new epoch) "
        "while a heartbeat for the old epoch was in flight; its 'lost' answer dropped the new claim, so one pause "
        "cost two deliveries (three seen against a cap of three).",
    ),
    (
        "8a165b4",
        "submit and wait_all gave up on the first lost connection (a submit whose reply was lost left the "
        "caller without the ids to retry with); a worker started while Redis was down crashed. Both now back off "
        "and retry, submit under the same request ids.",
    ),
    (
        "9f94dee",
        "build_request raised TypeError/OverflowError (timeout=[], metadata the client cannot pack) "
        "instead of a ValueError naming the field.",
    ),
    (
        "954d4ba",
        "An oversize payload was refused by the worker but copied whole into the dead-letter stream; dead "
        "letters now keep its first 64 KiB and its size.",
    ),
    (
        "f8c8bb6",
        "Engine: a prompt needing the whole KV pool (allowed by max_model_len) waited forever behind the "
        "admission watermark; its client never got an answer.",
    ),
    (
        "e531b54",
        "The worker's info log quoted refused values (stop strings, chat content in engine errors); info "
        "lines now carry only the field name.",
    ),
    (
        "4e46be6",
        "The gateway read request bodies of any size into memory; it now refuses bodies over 16 MiB with "
        "413 before reading them whole (the fix went in with that commit of the gateway's).",
    ),
]

OPEN = [
    "Redis with `appendfsync everysec` acknowledges a write before it is on disk. A SIGKILL of redis-server loses "
    "nothing acknowledged (the write(2) to the AOF happens before the reply is sent, so the page cache keeps it; "
    "the runs above confirm it), but a power loss or kernel crash can lose up to the last second, and so can a "
    "SIGKILL while a slow disk makes Redis postpone the AOF write (it does so for up to 2 s when an fsync is "
    "stuck). Closing that needs `appendfsync always` (every write waits for the disk) or WAITAOF (Redis 7.2; "
    "this machine has 7.0).",
    "Redis paused for longer than the claim threshold makes every in-flight request look abandoned: the first "
    "worker to run XAUTOCLAIM afterwards takes it over (+1 delivery, a `restart` for the client), even from itself. "
    "Nothing is lost or answered twice, but repeated long pauses can push a long-running request to the dead-letter "
    "cap (max_deliveries, default 3).",
    "When Redis runs a worker's claim script but the reply is lost, the worker does not know it holds those "
    "requests; they wait out the claim threshold and are restarted (counted under re-executed above).",
    "The workers' RSS still rises during the soak, by ever smaller steps (the slopes above). A separate 8-minute "
    "check, not part of this run, watched single worker processes under the same traffic: Python's allocated "
    "blocks (`sys.getallocatedblocks`) grew by +1,110, +850, +410 and +410 in successive minutes and +306 in "
    "the last 45 s; RSS grew alike (+1.2 to +1.5 MiB in 8 minutes) with glibc's arenas capped at 2 or with "
    "Python on plain malloc; and a tracemalloc comparison of minutes 1 and 4 of an in-process worker showed no "
    "type of object piling up (+0.2 MiB traced, in-flight buffers). That looks like buffers and dicts reaching "
    "their high-water marks, not requests left behind; but a 10-minute soak cannot show where it levels off, "
    "and an hours-long one has not been run.",
]


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows), ""]


def _faults(r: dict[str, Any]) -> list[str]:
    w = r["worker_chaos"]
    head = [
        "run",
        "requests",
        "faults injected",
        "lost",
        "duplicated terminals",
        "writes after terminal",
        "client-visible token errors",
        "re-executed (restarts)",
        "error events",
        "held",
    ]
    rows = [
        [
            "3 no-op workers: SIGKILL + restart, SIGSTOP past the claim threshold, connections cut",
            w["submitted"],
            f"{w['kills']} kills, {w['pauses']} pauses, {w['cuts']} cuts",
            w["lost"],
            w["duplicated"],
            w["after_terminal"],
            w["wrong_tokens"],
            f"{w['reexecuted']} ({w['restarts']})",
            sum(w["errors"].values()),
            _held(w),
        ]
    ]
    names = {
        "kill": "Redis SIGKILL + restart from AOF (everysec)",
        "sigstop": "Redis SIGSTOP / SIGCONT",
        "pause": "Redis CLIENT PAUSE ALL",
    }
    for f in r["redis_faults"]:
        rows.append(
            [
                names[f["fault"]],
                f["submitted"],
                f"{f['faults']} ({f['outage_s']} s unavailable)",
                f["lost"],
                f["duplicated"],
                f["after_terminal"],
                f["wrong_tokens"],
                f"{f['reexecuted']} ({f['restarts']})",
                sum(f["errors"].values()),
                _held(f),
            ]
        )
    out = _table(head, rows)
    capped = w["errors"].get("max_deliveries", 0)
    others = {code: n for code, n in w["errors"].items() if code != "max_deliveries"}
    out += [
        f"Worker faults: one every 0.3-0.9 s (half kills, 30 % pauses, 20 % cuts of every connection), so each "
        "of the 3 workers is killed or paused about every 2 s. The "
        "requests a dead worker held are taken over together about a second later (the claim threshold), often "
        f"just as the next fault lands on their new owner. {capped} request(s) lost three owners in a row and "
        "reached the delivery cap (`max_deliveries`, 3 by default): each got one `max_deliveries` error event "
        "and a dead letter, as the cap prescribes (it is there for requests that bring down every worker they "
        "reach). "
        + (f"**Other errors: {others}.** " if others else "No other error occurred. ")
        + f"Workers back from a pause or a cut found {w['fenced']} of their claims taken over and wrote nothing "
        "more for them.",
        "",
    ]
    probes = [
        f"{f['fault']}: {f['probe']['calls']} calls, {f['probe']['timeouts']} timeouts and "
        f"{f['probe']['connection_errors']} connection errors raised, longest {f['probe']['longest_s']} s, "
        f"highest delivery count {f['max_deliveries_seen']} (cap {f['max_deliveries']})"
        for f in r["redis_faults"]
    ]
    out += [
        "During the Redis faults a probe client kept submitting one-token requests with a 1 s timeout; every "
        "call ended, with a result or an error, none hung: " + "; ".join(probes) + ".",
        "",
    ]
    return out


def _held(run: dict[str, Any]) -> str:
    """Nothing lost or answered twice, every client saw the engine's tokens; errors only from the delivery cap."""
    ok = (
        run["lost"] == run["duplicated"] == run["after_terminal"] == run["wrong_tokens"] == 0
        and run["drained"]
        and set(run["errors"]) <= {"max_deliveries"}
    )
    return "yes" if ok else "**no**"


def _fuzz(r: dict[str, Any]) -> list[str]:
    a, w, c, g = r["fuzz_atheris"], r["fuzz_worker"], r["fuzz_client"], r["fuzz_gateway"]
    statuses = ", ".join(f"{k}: {v}" for k, v in g["statuses"].items())
    rows = [
        ["request decoder (atheris / libFuzzer)", a["runs"], a["crashes"], "-", f"{a['coverage_edges']} edges covered"],
        [
            "live worker process (hypothesis draws and their mutants)",
            w["entries"],
            int(not w["worker_alive"]) + w["error_log_lines"],
            w["violations"],
            f"{w['refused']} refused with an error event, {w['dead']} "
            f"dead-lettered (no usable id), {w['decodable']} served; RSS {w['rss_mb_first']} -> {w['rss_mb_last']} "
            f"MiB (growth after warm-up {w['rss_growth_mb']} MiB)",
        ],
        [
            "client-side validation, build_request (hypothesis)",
            c.get("examples"),
            c.get("failed", 0),
            "-",
            c["summary"],
        ],
        [
            "HTTP gateway (schemathesis, positive and negative)",
            g["cases"],
            g["server_errors"],
            "-",
            f"status codes {statuses}",
        ],
    ]
    return _table(
        ["target", "generated cases", "crashes / escaped exceptions / 500s", "unanswered or wrong", "notes"], rows
    )


def _scale_table(s: dict[str, Any]) -> list[str]:
    rows = [
        [
            p["workers"],
            p["requests"],
            p["seconds"],
            p["requests_per_s"],
            p["ideal_requests_per_s"],
            p["efficiency"],
            p["cpu_cores_used"],
            p["client_cpu_cores"],
        ]
        for p in s["points"]
    ]
    return _table(
        [
            "workers",
            "requests",
            "seconds",
            "requests/s",
            "ideal (slots / request time)",
            "efficiency vs linear",
            "CPU cores: Redis + workers",
            "CPU cores: client",
        ],
        rows,
    )


def _load(r: dict[str, Any]) -> list[str]:
    cap, s, busy = r["capacity_one_worker"], r["scale_out"], r["scale_out_busy"]
    eight = next(p["efficiency"] for p in s["points"] if p["workers"] == 8)
    out = [
        f"One worker, no-op engine: {cap['requests_per_s']:,} requests/s end to end (producer, worker, Redis and "
        f"reader on the same machine; {cap['requests']:,} one-token requests), "
        f"{cap['worker_drain_requests_per_s']:,} requests/s for the worker alone draining a filled queue, "
        f"{cap['token_events_per_s']:,} token events/s published ({cap['tokens_per_delta_entry']} tokens per "
        "stream entry).",
        "",
        f"Scale-out: worker processes against one Redis, engine {s['engine']}, {s['slots_per_worker']} slots "
        f"each, {s['max_tokens']} tokens per request, a backlog of {s['rounds']} requests per slot submitted at "
        "once; seconds and requests/s by Redis's clock (submit to the last result entry). The sleeping engine "
        "makes a worker's throughput a matter of slots and step time rather than CPU, so the figures measure "
        "what the queue costs when workers are added; the CPU columns (CPU seconds per wall second) show how "
        f"much of the machine's 2 cores Redis, the workers and the measuring client used. Efficiency at 8 "
        f"workers: {eight} (required: 0.9).",
        "",
        *_scale_table(s),
        f"The same with {busy['engine']} and {busy['slots_per_worker']} slots per worker ({busy['rounds']} "
        "requests per slot), ten times the request rate per worker: here the machine's two cores, shared by "
        "Redis, every worker and the client, are what runs out first.",
        "",
        *_scale_table(busy),
    ]
    return out


def _soak(r: dict[str, Any]) -> list[str]:
    s = r["soak"]
    if "redis_used_mb_middle" not in s:
        return ["(soak too short to compare)", ""]
    rows = [
        [
            f"{s['minutes']:g} min at {s['rate']:g}/s",
            s["requests"],
            s["lost"],
            s["wrong_tokens"],
            f"{s['redis_used_mb_middle']} -> {s['redis_used_mb_last']} ({s['redis_used_mb_growth']:+.1%})",
            f"{s['keys_middle']:.0f} -> {s['keys_last']:.0f}",
            f"{s['workers_rss_mb_middle']} -> {s['workers_rss_mb_last']} ({s['workers_rss_mb_growth']:+.1%})",
        ]
    ]
    return [
        f"Three workers under steady traffic with result streams expiring after {s['result_ttl_s']} s (a day by "
        "default); acked request entries are deleted as they are answered. Memory is compared between the "
        "middle and the last third of the run (medians of samples):",
        "",
        *_table(["soak", "requests", "lost", "wrong tokens", "Redis used MiB", "keys", "workers' RSS MiB"], rows),
        *_trend(s["samples"]),
    ]


def _trend(samples: list[dict[str, float]]) -> list[str]:
    """The samples at a few points, and the slopes (least squares) over the third and the last quarter of the
    run: a leak keeps its slope, a cache or buffer reaching its high-water mark loses it."""
    n = len(samples)
    quarters = [samples[n // 2 : 3 * n // 4], samples[3 * n // 4 :]]
    if min(len(q) for q in quarters) < 3:
        return []
    picks = [samples[0], samples[n // 4], samples[n // 2], samples[-1]]

    def slopes(name: str, unit: str) -> str:
        fits = [statistics.linear_regression([x["t_s"] / 60 for x in q], [x[name] for x in q]).slope for q in quarters]
        return f"{fits[0]:+.3f} then {fits[1]:+.3f} {unit}/min"

    return [
        "Samples (time: Redis used MiB / keys / the three workers' RSS MiB together): "
        + "; ".join(
            f"{x['t_s'] // 60:.0f}:{x['t_s'] % 60:02.0f} {x['redis_used_mb']} / {x['keys']} / {x['workers_rss_mb']}"
            for x in picks
        )
        + f". Slopes over the third and the last quarter of the run: Redis {slopes('redis_used_mb', 'MiB')}, "
        f"keys {slopes('keys', 'keys')}, workers' RSS {slopes('workers_rss_mb', 'MiB')}.",
        "",
    ]


def _security(r: dict[str, Any]) -> list[str]:
    rows = [
        [name, t.get("passed", 0), t.get("failed", 0) + t.get("error", 0), t.get("skipped", 0), t["summary"]]
        for name, t in (
            (
                "TLS (mutual, throwaway CA), size caps at producer/worker/gateway, no prompt text in "
                "info logs: tests/security",
                r["security"]["tls_caps_logs"],
            ),
            (
                "ACL users of compose/redis.conf, each role its job and nothing else: tests/compose/test_redis_acl.py",
                r["security"]["acl"],
            ),
        )
    ]
    return _table(["checks", "passed", "failed", "skipped", "pytest"], rows)


def render(r: dict[str, Any]) -> str:
    lines = [
        "# Reliability",
        "",
        f"Generated by `python bench/reliability.py` ({r['started']}, {r['machine']}; {r['seconds'] // 60} min"
        "). Every figure below is from that one run; the short versions of the same runs are tests in "
        "`tests/chaos` and `tests/security` (`make test`); `make chaos` runs the full fault and fuzz tests.",
        "",
    ]
    if r["quick"]:
        lines += [
            "**This page came from a `--quick` run: small sizes, to check the script, not figures to quote.**",
            "",
        ]
    lines += [
        "## Faults",
        "",
        "Lost: submitted and acknowledged, no terminal event by the end of the drain. "
        "Duplicated: terminal events past the first. Token errors: the tokens a client folded from the "
        "stream (dropping what came before a `restart`) differ from the engine's.",
        "",
        *_faults(r),
        "## Fuzzing",
        "",
        *_fuzz(r),
        "## Load and scale-out",
        "",
        *_load(r),
        "## Memory over a soak",
        "",
        *_soak(r),
        "## Security",
        "",
        *_security(r),
        "## What broke and was fixed",
        "",
    ]
    lines += [f"- `{commit}` {text}" for commit, text in FIXED]
    lines += ["", "## What stays open", ""] + [f"- {text}" for text in OPEN] + [""]
    return "\n".join(lines)
