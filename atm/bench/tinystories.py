"""``atm bench tinystories``: the overfitting language model, fixed recipe against the tools a practitioner
has (ReduceLROnPlateau, early stopping with restore) and against the manager watching the live run.

Arms, on the same data and seeds:

- ``fixed``: the overfit recipe, unmanaged;
- ``plateau``: the same plus ``torch.optim.lr_scheduler.ReduceLROnPlateau`` on validation loss;
- ``early-stop``: early stopping that restores the best checkpoint. It is a pure function of the
  fixed run's validation curve, so it is derived from that curve rather than rerun;
- ``managed-rules`` / ``managed-llm``: the overfit recipe with the listener, and the daemon (rules,
  or the LLM) watching it through the MLflow backend.

``--recipe healthy`` asks the other question, first do no harm: a run with dropout, weight decay, a
warm-up and cosine decay on a corpus it cannot memorise (slow start, noisy, improving to the end),
``fixed`` against the managed arms. A manager that helps overfitting runs must leave this one at
least as good as it was; the report counts every change and stop it made there.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from atm.bench.harness import (
    ArmRun,
    applied,
    available_proposers,
    common_args,
    default_out,
    drop_unbuildable,
    finished_run,
    init_store,
    markdown_table,
    mean_std,
    python_cmd,
    record_finished,
    run_arm,
    run_records,
    seed_count,
    stacked_remedies,
)

SEED0 = 40
EXPERIMENT = "bench-tinystories"


def add_parser(bsub: Any) -> None:
    p = bsub.add_parser("tinystories", help="the overfitting language model: fixed, plateau, early-stop, managed")
    common_args(p, seeds=3)
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the workload's)")
    p.add_argument("--policy", default="lm",
                   help="policy of the managed arms: a preset or a YAML file (default lm); e.g. one with "
                        "'extends: lm' and 'limits: {settle: {evals: 0}}' measures what waiting for effects does")
    p.add_argument("--recipe", choices=("overfit", "healthy"), default="overfit",
                   help="overfit (default): the paper's overfitting run; healthy: a run to leave alone (do no harm)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from atm.policies import load_policy
    from atm.training.workloads.tinystories.train import TrainResult, early_stop_with_restore

    # The evaluations an effect needs before it is known: the policy's settle window, or the default
    # measure's 3 when the policy waits for none.
    settle_evals = load_policy(getattr(args, "policy", "lm")).limits.settle.evals or 3

    out: Path = args.out or default_out("tinystories-healthy" if getattr(args, "recipe", "overfit") == "healthy"
                                        else "tinystories")
    out.mkdir(parents=True, exist_ok=True)
    seeds_n = seed_count(args)
    seeds = [SEED0 + i for i in range(seeds_n)]
    proposers = available_proposers(args.proposers)
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    init_store(uri, EXPERIMENT)
    healthy = getattr(args, "recipe", "overfit") == "healthy"
    extra = ["--quick"] if args.quick else []
    if args.steps:
        extra += ["--steps", str(args.steps)]
    arms = ["fixed"] + ([] if healthy else ["plateau"]) + [f"managed-{p}" for p in proposers]
    skipped = drop_unbuildable("tinystories", arms, "lm", requested=bool(args.proposers))
    print(f"atm bench tinystories: arms {', '.join(arms)} + early-stop (derived from fixed); seeds {seeds}; "
          f"store {uri}; results in {out}", flush=True)

    started = time.time()
    reused: list[str] = []
    results: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms + ["early-stop"]}
    for seed in seeds:
        for arm in arms:
            recipe = "plateau" if arm == "plateau" else ("healthy" if healthy else "overfit")
            json_path = out / "runs" / f"{arm}-seed{seed}.json"
            cmd = python_cmd("tinystories", "--tracking", "mlflow", "--tracking-uri", uri, "--experiment", EXPERIMENT,
                             "--run-name", f"{arm}-seed{seed}", "--recipe", recipe, "--seed", str(seed),
                             "--json", str(json_path), *extra)
            if not arm.startswith("managed-"):
                cmd.append("--no-listen")
            run = ArmRun(arm, seed, cmd, out / "logs" / f"{arm}-seed{seed}.log")
            done_path = out / "runs" / f"{arm}-seed{seed}.bench.json"
            # The same arguments (the interpreter may be named differently between invocations).
            done = finished_run(done_path, cmd[1:]) if args.resume else None
            if done is not None:
                run.run_id, run.wall_s = done["run_id"], done["wall_s"]
                run.records = run_records(uri, run.run_id)
                reused.append(f"{arm}-seed{seed}")
                print(f"  {arm:14s} seed {seed}: reused from {done_path}", flush=True)
            else:
                run_arm(run, uri, policy_spec=getattr(args, "policy", "lm") if arm.startswith("managed-") else None,
                        proposer_kind=arm.removeprefix("managed-") if arm.startswith("managed-") else None,
                        interval=args.interval)
                record_finished(done_path, cmd[1:], run_id=run.run_id, wall_s=run.wall_s)
            res = TrainResult.model_validate_json(json_path.read_text())
            results[arm][seed] = {
                "final_val_loss": res.final_val_loss,
                "best_val_loss": res.best_val_loss,
                "interventions": len(applied(run.records)),
                "val_curve": res.val_curve,
                "applied_steps": [r.applied_step for r in applied(run.records)],
                "moves": [r.summary() for r in applied(run.records)],
                # Remedies decided before the previous one's effect could be known (limits.settle's point).
                "stacked_remedies": stacked_remedies(run.records, [p[0] for p in res.val_curve], settle_evals),
                "stopped_at": res.steps_done if res.stopped_by_manager else None,
                "sources": [r.source for r in applied(run.records)],
                # Every decision by outcome: a manager that applied nothing shows why (stale, rejected ...).
                "decisions": dict(Counter(r.status.value for r in run.records)),
                "run_id": run.run_id,
                "wall_s": round(run.wall_s, 1),
            }
            if arm == "fixed":
                es = early_stop_with_restore(res.val_curve, res.config.early_stop_patience, res.config.early_stop_min_delta)
                results["early-stop"][seed] = {
                    "final_val_loss": es.final_val_loss, "best_val_loss": es.final_val_loss, "interventions": 0,
                    "val_curve": [p for p in res.val_curve if p[0] <= es.stop_step], "stop_step": es.stop_step,
                    "derived_from": "fixed",
                }
            print(f"  {arm:14s} seed {seed}: final val {res.final_val_loss:.4f}, best {res.best_val_loss:.4f}, "
                  f"interventions {results[arm][seed]['interventions']} ({run.wall_s:.0f} s)", flush=True)

    report = _report(results, seeds, args, uri, time.time() - started)
    report["config"]["reused_runs"] = reused
    report["config"]["arms_not_run"] = skipped
    (out / "tinystories.json").write_text(json.dumps(report, indent=2))
    md = _markdown(report)
    (out / "tinystories.md").write_text(md)
    _plot(results, out / "tinystories.png")
    print(md)
    print(f"written: {out / 'tinystories.json'}, {out / 'tinystories.md'}, {out / 'tinystories.png'}")
    return 0


def _report(results: dict[str, dict[int, dict[str, Any]]], seeds: list[int], args: argparse.Namespace,
            uri: str, wall: float) -> dict[str, Any]:
    arms = {}
    for arm, per_seed in results.items():
        arms[arm] = {k: [per_seed[s][k] for s in seeds] for k in ("final_val_loss", "best_val_loss", "interventions")}
        arms[arm]["per_seed"] = {str(s): per_seed[s] for s in seeds}
    fixed_final = mean_std(arms["fixed"]["final_val_loss"])[0]
    best_practice = min(mean_std(arms[a]["final_val_loss"])[0] for a in ("plateau", "early-stop") if a in arms)
    ratios = {}
    for arm in arms:
        if arm.startswith("managed-"):
            m = mean_std(arms[arm]["final_val_loss"])[0]
            ratios[arm] = {
                "final_vs_fixed": m / fixed_final, "final_vs_best_of_plateau_and_early_stop": m / best_practice,
                # Same seed, same curve up to the first change: the paired ratio is the fairer one.
                "final_vs_fixed_per_seed": [results[arm][s]["final_val_loss"] / results["fixed"][s]["final_val_loss"]
                                            for s in seeds],
                "stops": sum(results[arm][s].get("stopped_at") is not None for s in seeds),
                "stacked_remedies": [sum(results[arm][s].get("stacked_remedies", (0, 0))[k] for s in seeds) for k in (0, 1)],
            }
    return {
        "arms": arms,
        "seeds": seeds,
        "ratios": ratios,
        "config": {"quick": args.quick, "steps": args.steps, "interval_s": args.interval, "tracking_uri": uri,
                   "recipe": getattr(args, "recipe", "overfit"),
                   "policy": getattr(args, "policy", "lm"), "early_stop": "derived from each fixed run's validation curve (restore best)"},
        "wall_time_s": round(wall, 1),
        # What the runs took (reused ones included): the budget figure when a bench was resumed.
        "runs_wall_s_total": round(sum(d.get("wall_s", 0.0) for per_seed in results.values()
                                       for d in per_seed.values()), 1),
    }


def _markdown(report: dict[str, Any]) -> str:
    rows = []
    for arm, d in report["arms"].items():
        fm, fs = mean_std(d["final_val_loss"])
        bm, bs = mean_std(d["best_val_loss"])
        im, _ = mean_std(d["interventions"])
        rows.append([arm, f"{fm:.4f} ± {fs:.4f}", f"{bm:.4f} ± {bs:.4f}", f"{im:.1f}"])
    text = f"# atm bench tinystories (recipe {report['config'].get('recipe', 'overfit')})\n\n" + markdown_table(
        ["arm", "final val loss (mean ± sd)", "best val loss", "interventions"], rows)
    text += (f"\n\nSeeds {report['seeds']}; wall time {report['wall_time_s']:.0f} s "
             f"(the runs: {report.get('runs_wall_s_total', report['wall_time_s']):.0f} s). "
             "Early-stop is derived from the fixed runs' curves.\n")
    for arm, r in report["ratios"].items():
        decisions: Counter[str] = Counter()
        for d in report["arms"][arm]["per_seed"].values():
            decisions.update(d.get("decisions", {}))
        outcome = ", ".join(f"{n} {status}" for status, n in decisions.most_common()) or "none"
        paired = ", ".join(f"{x:.3f}" for x in r.get("final_vs_fixed_per_seed", []))
        text += (f"\n- {arm}: final val loss {r['final_vs_fixed']:.2f}x the fixed recipe's (per seed: {paired}); "
                 f"{r['final_vs_best_of_plateau_and_early_stop']:.2f}x the best of ReduceLROnPlateau and early stopping"
                 if "plateau" in report["arms"] else
                 f"\n- {arm}: final val loss {r['final_vs_fixed']:.3f}x the unmanaged run's (per seed: {paired}); "
                 f"{r.get('stops', 0)} of {len(report['seeds'])} runs stopped early")
        text += f"; decisions: {outcome}"
        stacked, followers = r.get("stacked_remedies", (0, 0))
        text += f"; remedies stacked before the previous one's effect was known: {stacked} of {followers}"
        if "plateau" not in report["arms"]:
            text += "".join(f"\n  - seed {seed}: " + ("; ".join(d.get("moves", [])) or "no change")
                            for seed, d in report["arms"][arm]["per_seed"].items())
    return text + "\n"


def _plot(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = {"fixed": "tab:red", "plateau": "tab:orange", "early-stop": "tab:gray", "managed-rules": "tab:blue",
              "managed-llm": "tab:green"}
    for arm, per_seed in results.items():
        for i, (seed, d) in enumerate(sorted(per_seed.items())):
            steps = [p[0] for p in d["val_curve"]]
            vals = [p[1] for p in d["val_curve"]]
            ax.plot(steps, vals, color=colors.get(arm), alpha=0.8, lw=1.2, label=arm if i == 0 else None,
                    ls="--" if arm == "early-stop" else "-")
            for st in d.get("applied_steps", []):
                if st is None:
                    continue
                y = vals[min(range(len(steps)), key=lambda j: abs(steps[j] - st))]
                ax.plot([st], [y], marker="v", color=colors.get(arm), ms=7)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("TinyStories-style LM: validation loss (▼ = intervention applied)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
