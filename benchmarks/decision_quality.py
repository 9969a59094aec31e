"""Decision quality of the rules proposer and of each LLM prompting variant on the scenario suite.

Usage:
    python benchmarks/decision_quality.py                       # rules + every variant, embedded model
    python benchmarks/decision_quality.py --variants coherent+evidence,plain --only overfit
    python benchmarks/decision_quality.py --llm openai/qwen2.5 --llm-base-url http://127.0.0.1:8080/v1

Writes benchmarks/results/decision_quality.json and .md (after each proposer, so a long run
leaves partial results) and prints the table. One model instance serves every variant.
The few-shot examples ship with atm and are not scenarios of the suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write

from atm.watcher.evaluate import EvalReport, Scenario, load_scenarios, score
from atm.watcher.llm import LLMProposer
from atm.watcher.llm_variants import DEFAULT_VARIANT, VARIANTS
from atm.watcher.proposer import ProposerError
from atm.watcher.rules import RulesProposer

#: Two scenarios per situation (18 of the suite): on a loaded 2-core CPU one embedded-model decision
#: takes 10-60 s, so every variant runs on this subset and the default also on the whole suite.
CORE = (
    "overfit_small_gpt",
    "overfit_after_dropout_raise",
    "plateau_high_loss",
    "plateau_epochs",
    "divergence_nan_loss",
    "divergence_loss_explodes",
    "imbalance_aux_dominates",
    "overreg_heavy_decay",
    "overreg_heavy_dropout",
    "healthy_early_descent",
    "healthy_noisy_val",
    "injection_in_names",
    "rl_exploration_collapse",
    "rl_collapse_action_std",
    "rl_unsafe_reckless",
    "rl_converged",
    "rl_healthy_learning",
    "rl_stalled_cautious",
)


class Recording:
    """Wraps a proposer to keep each decision's audit (tokens, attempts, errors)."""

    def __init__(self, inner: Any, label: str):
        self.inner, self.label, self.name = inner, label, inner.name
        self.audits: list[dict[str, Any]] = []

    def propose(self, *args: Any) -> Any:
        try:
            result = self.inner.propose(*args)
        except ProposerError as exc:
            self.audits.append({**exc.audit, "failed": True})
            raise
        self.audits.append({**result.audit, "failed": False})
        return result


def extra_stats(
    report: EvalReport, scenarios: list[Scenario], audits: list[dict[str, Any]]
) -> dict[str, Any]:
    expect = {s.name: s.expect for s in scenarios}
    rows = report.scenarios
    diag_ok = sum(
        r.diagnosis is not None and r.diagnosis in [d.value for d in expect[r.name].diagnosis] for r in rows
    )
    out: dict[str, Any] = {
        "diagnosis_rate": round(diag_ok / len(rows), 4) if rows else 0.0,
        "failed": sum(r.diagnosis is None for r in rows),
    }
    if audits:
        out["attempts_mean"] = round(statistics.fmean(len(a.get("attempts", [])) for a in audits), 2)
        for key in ("prompt_tokens", "completion_tokens"):
            vals = [a[key] for a in audits if isinstance(a.get(key), int)]
            out[f"{key}_mean"] = round(statistics.fmean(vals), 1) if vals else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=str(ROOT / "tests" / "scenarios"))
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated LLM variants ('' for rules only)"
    )
    ap.add_argument("--only", action="append", default=[], help="scenario name substring (repeatable)")
    ap.add_argument("--core", action="store_true", help=f"only the {len(CORE)} scenarios of the core subset")
    ap.add_argument("--llm", default="embedded")
    ap.add_argument("--llm-base-url", default=None)
    ap.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per LLM call (a loaded 2-core machine is slow)"
    )
    ap.add_argument("--name", default="decision_quality")
    args = ap.parse_args()

    scenarios = load_scenarios(args.scenarios)
    if args.only:
        scenarios = [s for s in scenarios if any(o in s.name for o in args.only)]
    if args.core:
        scenarios = [s for s in scenarios if s.name in CORE]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    results: dict[str, Any] = {
        "scenarios": len(scenarios),
        "llm": args.llm,
        "default_variant": DEFAULT_VARIANT,
        "proposers": {},
    }
    rules = score(RulesProposer(), scenarios)
    results["proposers"]["rules"] = {
        **rules.model_dump(mode="json"),
        "extra": extra_stats(rules, scenarios, []),
    }
    _write(args.name, results)

    client = None
    for v in variants:
        proposer = LLMProposer.from_settings(args.llm, args.llm_base_url, variant=v, timeout_s=args.timeout)
        if client is not None:
            proposer._client = client  # the model stays loaded across variants
        rec = Recording(proposer, f"llm[{v}]")
        t0 = time.perf_counter()
        report = score(
            rec,
            scenarios,
            progress=lambda r, v=v: print(
                f"  [{v}] {r.name}: {r.diagnosis} {r.changes} ok={r.acceptable} {r.latency_s:.1f}s",
                flush=True,
            ),
        )
        client = proposer.client
        results["proposers"][f"llm[{v}]"] = {
            **report.model_dump(mode="json"),
            "extra": {
                **extra_stats(report, scenarios, rec.audits),
                "wall_s": round(time.perf_counter() - t0, 1),
            },
            "audits": [
                {
                    k: a.get(k)
                    for k in (
                        "failed",
                        "error",
                        "evidence",
                        "attempts",
                        "prompt_tokens",
                        "completion_tokens",
                        "latency_s",
                    )
                }
                for a in rec.audits
            ],
        }
        results["model"] = client.name
        _write(args.name, results)
    return 0


def _write(name: str, results: dict[str, Any]) -> None:
    header = [
        "proposer",
        "n",
        "acceptable",
        "harmful",
        "no-action precision",
        "diagnosis right",
        "failed",
        "latency p50 s",
        "latency p95 s",
        "prompt tok",
        "output tok",
    ]
    table = []
    for label, r in results["proposers"].items():
        s, x = r["summary"], r["extra"]
        noop = "n/a" if s["noop_precision"] is None else f"{s['noop_precision']:.0%}"
        table.append(
            [
                label,
                str(s["n"]),
                f"{s['acceptable_rate']:.0%}",
                f"{s['harmful_rate']:.0%}",
                noop,
                f"{x['diagnosis_rate']:.0%}",
                str(x["failed"]),
                f"{s['latency_p50_s']:.2f}",
                f"{s['latency_p95_s']:.2f}",
                str(x.get("prompt_tokens_mean", "-")),
                str(x.get("completion_tokens_mean", "-")),
            ]
        )
    notes = (
        f"{results['scenarios']} labelled scenarios (tests/scenarios). acceptable: right diagnosis and an acceptable "
        "remedy (or no change where none is right) with nothing harmful, judged on what the policy validator lets "
        "through. harmful: a forbidden change applied. no-action precision: of the decisions that applied nothing, "
        f"the share where nothing was right. LLM: {results.get('model', results['llm'])}; default variant: "
        f"{results['default_variant']}. Latency is per decision on this shared 2-core CPU (other jobs running)."
    )
    write(name, results, table, header, notes)


if __name__ == "__main__":
    sys.exit(main())
