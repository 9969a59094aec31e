"""Decision latency of the embedded LLM, with and without reuse of the prompt prefix's KV cache,
beside the rules proposer's, on the labelled scenarios' decision prompts.

The proposer is the daemon's: ``LLMProposer`` over the embedded SmolLM2-135M, run in-process with
atm's thread count. For every scenario where the model is asked (the anchored variants skip the
model when nothing may be done), the default variant's decision is made twice, back to back on the
same loaded model so that machine noise hits both arms alike:

- ``cached``: the model as the daemon runs it; the prompt prefix shared with the previous call
  (chat template and system prompt) comes from the KV cache.
- ``uncached``: the same call with the cache forgotten first: the whole prompt is evaluated.

``--compare anchored`` (the default) then makes the same decisions with another variant, cached,
in the same run and under the same condition: the prompt and answer the default replaced, for a
before/after ratio. Each variant's decisions run as one block, so that the cache holds what the
daemon's would (the previous decision of the same variant).

``--busy`` adds a training job on another core while measuring (a one-thread torch loop in a
subprocess), as a daemon beside its job would see. Re-asks are included: a decision's latency is
the wall time of ``propose`` (the default 2 re-asks; the timeout is raised so that a slow machine
measures rather than falls back).

    python benchmarks/llm_latency.py                   # idle, then beside a training job
    python benchmarks/llm_latency.py --every 2 --conditions busy   # half the scenarios, beside a job
    python benchmarks/llm_latency.py --compare ""       # the default variant only

Writes benchmarks/results/llm_latency.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import summary, write

from atm.adapters.llm import LlamaBackend, LLMClient, LLMConfig, default_threads, embedded_model_path
from atm.watcher.evaluate import load_scenarios, situation
from atm.watcher.llm import DEFAULT_VARIANT, LLMProposer
from atm.watcher.proposer import ProposerError
from atm.watcher.rules import RulesProposer

#: A training job on one core: small MLP steps until killed, or until the benchmark is gone (a killed
#: benchmark runs no ``finally``).
BUSY_JOB = """
import os, sys, torch
parent = int(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x = torch.randn(128, 256)
while os.getppid() == parent:
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
"""


def proposer(reuse_prefix: bool, cfg: LLMConfig, variant: str = DEFAULT_VARIANT) -> LLMProposer:
    path = embedded_model_path()
    backend = LlamaBackend(
        path,
        label=f"embedded:{path.stem}",
        timeout_s=cfg.timeout_s,
        n_ctx=cfg.n_ctx,
        n_threads=cfg.n_threads,
        reuse_prefix=reuse_prefix,
    )
    return LLMProposer(LLMClient(backend, cfg), variant=variant)


def decide(p: Any, sit: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        audit, failed = p.propose(sit.snapshot, sit.policy, sit.ctx, sit.offer).audit, False
    except ProposerError as exc:
        audit, failed = exc.audit, True
    attempts = audit.get("attempts") or []
    return {
        "latency_s": round(time.perf_counter() - t0, 3),
        "skipped": "skipped" in audit,
        "failed": failed,
        "attempts": len(attempts),
        "prompt_tokens": audit.get("prompt_tokens"),
        "cached_tokens": audit.get("cached_tokens"),
        "completion_tokens": audit.get("completion_tokens"),
        "answers": [a["raw"] for a in attempts],
    }


def measure(situations: list[Any], cfg: LLMConfig, condition: str, compare: str | None) -> dict[str, Any]:
    rules = RulesProposer()
    rules_s = []
    for sit in situations:
        t0 = time.perf_counter()
        rules.propose(sit.snapshot, sit.policy, sit.ctx, sit.offer)
        rules_s.append(time.perf_counter() - t0)
    cached, uncached = proposer(True, cfg), proposer(False, cfg)
    rows: list[dict[str, Any]] = []
    load0 = os.getloadavg()[0]
    for name, sit in situations_named(situations):
        c = decide(cached, sit)
        if c["skipped"]:
            continue  # the model is not asked here: nothing to time
        u = decide(uncached, sit)
        rows.append({"scenario": name, "cached": c, "uncached": u, "same_answer": c["answers"] == u["answers"]})
        print(
            f"  [{condition}] {name}: cached {c['latency_s']:.1f} s ({c['cached_tokens']}/{c['prompt_tokens']} "
            f"prompt tokens from cache), uncached {u['latency_s']:.1f} s, same answer: {rows[-1]['same_answer']}",
            flush=True,
        )
    if compare:
        before = proposer(True, cfg, compare)
        for row in rows:
            sit = dict(situations_named(situations))[row["scenario"]]
            row["compared"] = b = decide(before, sit)
            print(f"  [{condition}] {row['scenario']}: {compare}, cached {b['latency_s']:.1f} s "
                  f"({b['cached_tokens']}/{b['prompt_tokens']} prompt tokens from cache)", flush=True)
    arms = {arm: [r[arm]["latency_s"] for r in rows] for arm in ("cached", "uncached")}
    ratios = [r["cached"]["latency_s"] / r["uncached"]["latency_s"] for r in rows if r["uncached"]["latency_s"] > 0]
    out = {
        "rules": summary(rules_s),
        "cached": summary(arms["cached"]),
        "uncached": summary(arms["uncached"]),
        "cached_over_uncached": summary(ratios),
        "same_answer": sum(r["same_answer"] for r in rows),
        "decisions": rows,
    }
    if compare:
        # Only decisions where both variants asked the model (an anchored variant may skip one the other asks).
        both = [r for r in rows if not r["compared"]["skipped"]]
        out["compared"] = summary([r["compared"]["latency_s"] for r in both])
        out["cached_over_compared"] = summary(
            [r["cached"]["latency_s"] / r["compared"]["latency_s"] for r in both if r["compared"]["latency_s"] > 0]
        )
    out["loadavg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return out


def situations_named(situations: list[Any]) -> list[tuple[str, Any]]:
    return [(sit.snapshot.run_id, sit) for sit in situations]


def mean_of(rows: list[dict[str, Any]], arm: str, key: str) -> str:
    vals = [r[arm][key] for r in rows if isinstance(r[arm][key], int)]
    return f"{sum(vals) / len(vals):.0f}" if vals else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=str(ROOT / "tests" / "scenarios"))
    ap.add_argument("--every", type=int, default=1, help="every Nth scenario only (by name), for a shorter run")
    ap.add_argument("--conditions", default="idle,busy", help="idle, busy (a training job on another core), or both")
    ap.add_argument("--threads", type=int, default=None, help=f"model threads (default: atm's, {default_threads()} here)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model call")
    ap.add_argument("--compare", default="anchored",
                    help="another variant to time on the same decisions, cached (empty: none)")
    ap.add_argument("--name", default="llm_latency")
    args = ap.parse_args()
    conditions = [c for c in args.conditions.split(",") if c]
    if any(c not in ("idle", "busy") for c in conditions):
        ap.error(f"--conditions takes idle and/or busy, got {args.conditions!r}")

    scenarios = load_scenarios(args.scenarios)
    situations = [situation(sc) for sc in scenarios]
    situations = situations[:: max(args.every, 1)]
    cfg = LLMConfig.resolve("embedded", environ={}, timeout_s=args.timeout, n_threads=args.threads)
    results: dict[str, Any] = {
        "model": f"embedded:{embedded_model_path().stem}",
        "variant": DEFAULT_VARIANT,
        "compared_variant": args.compare or None,
        "threads": args.threads or default_threads(),
        "scenarios": len(situations),
        "conditions": {},
    }
    for cond in conditions:
        job = None
        if cond == "busy":
            job = subprocess.Popen([sys.executable, "-c", textwrap.dedent(BUSY_JOB), str(os.getpid())])
            time.sleep(3)  # past torch's import
        try:
            results["conditions"][cond] = measure(situations, cfg, cond, args.compare or None)
        finally:
            if job is not None:
                job.kill()
                job.wait()
        _write(args.name, results)
    return 0


def _write(name: str, results: dict[str, Any]) -> None:
    header = ["condition", "proposer", "decisions", "p50 s", "p95 s", "mean s", "prompt tok", "from cache", "output tok"]
    table = []
    for cond, r in results["conditions"].items():
        rows = r["decisions"]
        table.append([cond, "rules", str(r["rules"]["n"]), f"{r['rules']['p50']:.4f}", f"{r['rules']['p95']:.4f}",
                      f"{r['rules']['mean']:.4f}", "-", "-", "-"])
        variant = results["variant"]
        for arm in ("cached", "uncached"):
            s = r[arm]
            table.append([cond, f"llm[{variant}], {arm}", str(s["n"]), f"{s['p50']:.1f}", f"{s['p95']:.1f}",
                          f"{s['mean']:.1f}", mean_of(rows, arm, "prompt_tokens"), mean_of(rows, arm, "cached_tokens"),
                          mean_of(rows, arm, "completion_tokens")])
        if "compared" in r:
            s, both = r["compared"], [row for row in rows if not row["compared"]["skipped"]]
            table.append([cond, f"llm[{results['compared_variant']}], cached", str(s["n"]), f"{s['p50']:.1f}",
                          f"{s['p95']:.1f}", f"{s['mean']:.1f}", mean_of(both, "compared", "prompt_tokens"),
                          mean_of(both, "compared", "cached_tokens"), mean_of(both, "compared", "completion_tokens")])
    ratio = "; ".join(
        f"{cond}: cached/uncached per decision p50 {r['cached_over_uncached']['p50']:.2f}, same answer in "
        f"{r['same_answer']}/{len(r['decisions'])}"
        + (f", {results['variant']}/{results['compared_variant']} (both cached) per decision p50 "
           f"{r['cached_over_compared']['p50']:.2f}" if "compared" in r else "")
        + f", 1-min load average {r['loadavg_1min'][0]} -> {r['loadavg_1min'][1]}"
        for cond, r in results["conditions"].items()
    )
    notes = (
        f"{results['model']}, {results['threads']} thread(s), in-process. "
        "decisions: scenarios of tests/scenarios where the model is asked (the rules row: every scenario). "
        "A decision's latency includes re-asks. cached: the daemon's setting (the prompt prefix shared with the "
        "previous call is reused); uncached: the whole prompt evaluated. prompt tok / from cache / output tok: "
        "means per decision. busy: a one-thread torch training loop ran beside it. " + ratio + "."
    )
    write(name, results, table, header, notes)


if __name__ == "__main__":
    sys.exit(main())
