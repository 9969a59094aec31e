"""``atm bench manipulation``: the arm-and-obstacle PPO task, fixed recipes against the manager.

For the cautious and the reckless recipe, on the same seeds:

- ``fixed``: the recipe, unmanaged (no listener);
- ``managed-rules`` / ``managed-llm``: the recipe with the listener, and the daemon (rules, or the
  LLM) watching the run through the MLflow backend with the ``rl-ppo`` policy.

The manager sees only what the job logs: training statistics and the evaluation set (``eval/*``).
Results are measured on a second held-out set (the test set, ``--test-episodes`` of the workload),
evaluated at the same steps and never logged, so the manager cannot have tuned to it.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from atm.schema import DecisionRecord
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
    seed_count,
)

SEED0 = 40
RECIPES = ("cautious", "reckless")
EXPERIMENT = "bench-manipulation"
#: Safe success that counts as "reached" for ``steps_to_0.8``.
REACH = 0.8
#: Test scenes per difficulty (36 per policy mode); the evaluation set the manager sees has 12 too.
TEST_EPISODES = 12
#: ``--quick``: a smoke run of the whole pipeline (budget, evaluation spacing, scenes per difficulty);
#: long enough to pass the rl-ppo warm-up (20k steps) and leave the manager a few evaluations.
QUICK = {"timesteps": 32_768, "eval_every": 4_096, "eval_episodes": 4, "test_episodes": 4}


def add_parser(bsub: Any) -> None:
    p = bsub.add_parser("manipulation",
                        help="the arm-and-obstacle PPO task: cautious and reckless, fixed and managed")
    common_args(p, seeds=3)
    p.add_argument("--timesteps", type=int, default=None, help="env steps per run (default: the workload's, 300k)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated (default {','.join(RECIPES)})")
    p.add_argument("--arms", default=None,
                   help="comma-separated subset of fixed, managed-rules, managed-llm (default: fixed and --proposers)")
    # Each job trains with one torch thread; on 2 cores, --quick took 100 s with 2 jobs and 149 s with 1.
    p.add_argument("--jobs", type=int, default=2,
                   help="training processes at once (each uses one core; default 2); managed-llm runs go last, one at a time")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    out: Path = args.out or default_out("manipulation")
    out.mkdir(parents=True, exist_ok=True)
    seeds_n = seed_count(args)
    seeds = [SEED0 + i for i in range(seeds_n)]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in recipes if r not in ("baseline", "cautious", "reckless")]
    if bad:
        raise SystemExit(f"atm bench manipulation: unknown recipes {bad}; choose from baseline, cautious, reckless")
    if args.jobs < 1:
        raise SystemExit(f"atm bench manipulation: --jobs must be at least 1, got {args.jobs}")
    if getattr(args, "arms", None):
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        bad = [a for a in arms if a not in ("fixed", "managed-rules", "managed-llm")]
        if bad:
            raise SystemExit(f"atm bench manipulation: unknown arms {bad}; "
                             "choose from fixed, managed-rules, managed-llm")
    else:
        arms = ["fixed"] + [f"managed-{p}" for p in available_proposers(args.proposers)]
    skipped = drop_unbuildable("manipulation", arms, "rl-ppo", requested=bool(args.proposers or getattr(args, "arms", None)))
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    init_store(uri, EXPERIMENT)
    extra = _workload_args(args)
    print(f"atm bench manipulation: recipes {', '.join(recipes)}; arms {', '.join(arms)}; seeds {seeds}; "
          f"{args.jobs} at a time (managed-llm last, alone); store {uri}; results in {out}", flush=True)

    jobs = [(recipe, arm, seed) for seed in seeds for recipe in recipes for arm in arms]
    results: dict[str, dict[str, dict[int, dict[str, Any]]]] = {r: {a: {} for a in arms} for r in recipes}
    lock = threading.Lock()
    started = time.time()
    failures: dict[str, str] = {}
    reused: list[str] = []

    def one(recipe: str, arm: str, seed: int) -> None:
        name = f"{recipe}-{arm}-seed{seed}"
        json_path = out / "runs" / f"{name}.json"
        done_path = out / "runs" / f"{name}.bench.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        done = finished_run(done_path, extra) if args.resume else None
        if done is not None:
            with lock:
                results[recipe][arm][seed] = done["row"]
                reused.append(name)
            print(f"  {name:32s} reused from {done_path}", flush=True)
            return
        cmd = python_cmd("manipulation", "--recipe", recipe, "--seed", str(seed), "--tracking", "mlflow",
                         "--tracking-uri", uri, "--experiment", EXPERIMENT, "--run-name", name,
                         "--out", str(json_path), *extra)
        managed = arm.startswith("managed-")
        if not managed:
            cmd.append("--no-listen")
        run = ArmRun(arm, seed, cmd, out / "logs" / f"{name}.log")
        try:
            run_arm(run, uri, policy_spec="rl-ppo" if managed else None,
                    proposer_kind=arm.removeprefix("managed-") if managed else None, interval=args.interval)
            row = summarize(json.loads(json_path.read_text()), run.records)
        except Exception as exc:  # keep the other runs going; this one can be redone with --resume
            with lock:
                failures[name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"  {name:32s} FAILED: {failures[name][:300]}", flush=True)
            return
        row.update(run_id=run.run_id, wall_s=round(run.wall_s, 1))
        record_finished(done_path, extra, row=row)
        with lock:
            results[recipe][arm][seed] = row
            print(f"  {name:32s} final safe {row['final_safe_success']:.2f} (best {row['best_safe_success']:.2f}), "
                  f"collision {row['collision_rate']:.2f}, to {REACH}: {row['steps_to_0.8'] or '-'}, "
                  f"interventions {row['interventions']} ({run.wall_s:.0f} s)", flush=True)

    # The LLM arms run last and one at a time: their daemons share one in-process model, and a
    # decision that waits behind another run's, on cores the training jobs also want, arrives
    # after the run has moved on and is discarded as stale (seen: 19-92 s decisions, none applied).
    llm_jobs = [j for j in jobs if j[1] == "managed-llm"]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(one, *job) for job in jobs if job not in llm_jobs]:
            f.result()
    for job in llm_jobs:
        one(*job)
    if failures:
        print(f"atm bench manipulation: {len(failures)} of {len(jobs)} runs failed (logs in {out / 'logs'}); "
              f"rerun the same command with --resume to redo only those:", flush=True)
        for name, why in failures.items():
            print(f"  {name}: {why}", flush=True)
        return 1

    report = build_report(results, seeds, config={
        "quick": args.quick, "timesteps": args.timesteps, "interval_s": args.interval, "jobs": args.jobs,
        "tracking_uri": uri, "policy": "rl-ppo", "workload_args": extra,
        "measured_on": f"test scenes ({QUICK['test_episodes'] if args.quick else TEST_EPISODES} per difficulty, "
                       "never logged; the manager saw only the evaluation scenes, eval/*)",
        "reused_runs": sorted(reused),
        "arms_not_run": {a: skipped.get(a, "not requested")
                         for a in ("managed-rules", "managed-llm") if a not in arms},
    }, wall=time.time() - started)
    (out / "manipulation.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "manipulation.md").write_text(md)
    plot(report, out / "manipulation.png")
    print(md)
    print(f"written: {out / 'manipulation.json'}, {out / 'manipulation.md'}, {out / 'manipulation.png'}")
    return 0


def _workload_args(args: argparse.Namespace) -> list[str]:
    settings: dict[str, int] = dict(QUICK) if args.quick else {"test_episodes": TEST_EPISODES}
    if args.timesteps:
        settings["timesteps"] = args.timesteps
    out: list[str] = []
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def summarize(run_json: dict[str, Any], records: Sequence[DecisionRecord]) -> dict[str, Any]:
    """One run's figures on the test set, plus what the manager did. Pure.

    ``run_json`` is the workload's ``--out`` file (its ``tests`` hold the test-set evaluations).
    """
    tests = run_json.get("tests") or []
    if not tests:
        raise ValueError("the run has no test-set evaluations; run the workload with --test-episodes N")
    curve = [(int(p["step"]), p["metrics"]) for p in tests]
    safe = [m["test/safe_success"] for _, m in curve]
    final = curve[-1][1]
    reached = next((s for s, m in curve if m["test/safe_success"] >= REACH), None)
    done = applied(records)
    return {
        "final_safe_success": final["test/safe_success"],
        "best_safe_success": max(safe),
        "collision_rate": final["test/collision_rate"],
        "steps_to_0.8": reached,
        "final_stochastic_safe_success": final["test/stochastic/safe_success"],
        "final_stochastic_collision_rate": final["test/stochastic/collision_rate"],
        "final_robust_score": final["test/robust_score"],
        "steps": int(run_json["timesteps"]),
        "stopped_early": bool(run_json.get("stopped_early")),
        "rollbacks": int(run_json.get("rollbacks", 0)),
        "interventions": len(done),
        "decisions": [r.summary() for r in records],
        "applied": [{"step": r.step, "applied_step": r.applied_step, "diagnosis": r.diagnosis.value,
                     "changes": {k: [c.old, c.new] for k, c in r.changes.items()},
                     "action": r.action.value if r.action else None, "source": r.source} for r in done],
        "curve": [{"step": s, "safe_success": m["test/safe_success"], "collision_rate": m["test/collision_rate"],
                   "stochastic_safe_success": m["test/stochastic/safe_success"],
                   "stochastic_collision_rate": m["test/stochastic/collision_rate"]} for s, m in curve],
        "eval_curve": [{"step": int(p["step"]), "safe_success": p["metrics"]["eval/safe_success"],
                        "collision_rate": p["metrics"]["eval/collision_rate"]} for p in run_json["evaluations"]],
    }


#: Per-seed lists in the report, in seed order.
HEADLINE = ("final_safe_success", "best_safe_success", "collision_rate", "steps_to_0.8",
            "final_stochastic_safe_success", "final_stochastic_collision_rate", "interventions", "steps")


def build_report(results: dict[str, dict[str, dict[int, dict[str, Any]]]], seeds: list[int],
                 config: dict[str, Any], wall: float) -> dict[str, Any]:
    """``{recipe: {arm: {metric: [per seed]}, ...}, "seeds", "ratios", "config", ...}``. Pure."""
    report: dict[str, Any] = {}
    ratios: dict[str, dict[str, Any]] = {}
    for recipe, arms in results.items():
        report[recipe] = {}
        for arm, per_seed in arms.items():
            d: dict[str, Any] = {k: [per_seed[s][k] for s in seeds] for k in HEADLINE}
            d["per_seed"] = {str(s): per_seed[s] for s in seeds}
            report[recipe][arm] = d
        fixed = report[recipe].get("fixed")
        for arm, d in report[recipe].items():
            if arm == "fixed" or fixed is None:
                continue
            ratios.setdefault(recipe, {})[arm] = compare(fixed, d)
    report["seeds"] = seeds
    report["ratios"] = ratios
    report["config"] = config
    report["wall_time_s"] = round(wall, 1)
    return report


def compare(fixed: dict[str, Any], managed: dict[str, Any]) -> dict[str, Any]:
    """Managed against fixed: safe-success gain, collision ratio, and steps to 0.8 as a share of fixed's. Pure."""
    fm, mm = mean_std(fixed["final_safe_success"])[0], mean_std(managed["final_safe_success"])[0]
    fc, mc = mean_std(fixed["collision_rate"])[0], mean_std(managed["collision_rate"])[0]
    # Steps to 0.8 only compares seeds where both arms got there.
    pairs = [(f, m) for f, m in zip(fixed["steps_to_0.8"], managed["steps_to_0.8"])
             if f is not None and m is not None]
    fsm = mean_std(fixed["final_stochastic_safe_success"])[0]
    msm = mean_std(managed["final_stochastic_safe_success"])[0]
    fsc = mean_std(fixed["final_stochastic_collision_rate"])[0]
    msc = mean_std(managed["final_stochastic_collision_rate"])[0]
    return {
        "final_safe_success_gain": mm - fm,
        "final_safe_success_ratio": mm / fm if fm > 0 else None,
        "collision_rate_ratio": mc / fc if fc > 0 else None,
        "final_stochastic_safe_success_gain": msm - fsm,
        "stochastic_collision_rate_ratio": msc / fsc if fsc > 0 else None,
        "budget_used": mean_std(managed["steps"])[0] / mean_std(fixed["steps"])[0],
        "steps_to_0.8_ratio": (sum(m for _, m in pairs) / sum(f for f, _ in pairs)) if pairs else None,
        "seeds_reaching_0.8": {"fixed": sum(s is not None for s in fixed["steps_to_0.8"]),
                               "managed": sum(s is not None for s in managed["steps_to_0.8"])},
    }


def _ms(xs: Sequence[float | None], digits: int = 2) -> str:
    m, s = mean_std([x for x in xs if x is not None])
    return "-" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"


def _steps(xs: Sequence[int | None]) -> str:
    got = [x for x in xs if x is not None]
    if not got:
        return f"never (0/{len(xs)})"
    return f"{sum(got) / len(got) / 1000:.0f}k ({len(got)}/{len(xs)})"


def markdown(report: dict[str, Any]) -> str:
    rows = []
    for recipe in (r for r in report if r not in ("seeds", "ratios", "config", "wall_time_s")):
        for arm, d in report[recipe].items():
            rows.append([recipe, arm, _ms(d["final_safe_success"]), _ms(d["best_safe_success"]),
                         _ms(d["collision_rate"]), _steps(d["steps_to_0.8"]),
                         f"{_ms(d['final_stochastic_safe_success'])} / {_ms(d['final_stochastic_collision_rate'])}",
                         _ms(d["interventions"], 1)])
    text = "# atm bench manipulation\n\n" + markdown_table(
        ["recipe", "arm", "final safe success", "best safe success", "final collision rate",
         f"steps to {REACH} (seeds)", "final stochastic safe / collision", "interventions"], rows)
    cfg = report["config"]
    text += (f"\n\nMean ± sd over seeds {report['seeds']}, deterministic policy unless noted, "
             f"on {cfg['measured_on']}. Wall time {report['wall_time_s']:.0f} s")
    n_reused = len(cfg.get("reused_runs") or [])
    text += f" (runs made now; {n_reused} more reused from an earlier invocation)." if n_reused else "."
    for arm, why in (cfg.get("arms_not_run") or {}).items():
        text += f" Not run: {arm} ({why})."
    text += "\n"
    for recipe, arms in report["ratios"].items():
        for arm, r in arms.items():
            parts = [f"final safe success {r['final_safe_success_gain']:+.2f} against fixed"]
            if r["final_safe_success_ratio"] is not None:
                parts[-1] += f" ({r['final_safe_success_ratio']:.2f}x)"
            if r["collision_rate_ratio"] is not None:
                parts.append(f"collision rate {r['collision_rate_ratio']:.2f}x fixed's")
            if "final_stochastic_safe_success_gain" in r:
                parts.append(f"stochastic policy: safe success {r['final_stochastic_safe_success_gain']:+.2f}")
                if r["stochastic_collision_rate_ratio"] is not None:
                    parts[-1] += f", collision rate {r['stochastic_collision_rate_ratio']:.2f}x fixed's"
                parts.append(f"{r['budget_used']:.0%} of fixed's env steps used")
            if r["steps_to_0.8_ratio"] is not None:
                parts.append(f"reached {REACH} in {r['steps_to_0.8_ratio']:.0%} of fixed's steps "
                             "(seeds where both did)")
            reach = r["seeds_reaching_0.8"]
            parts.append(f"seeds reaching {REACH}: fixed {reach['fixed']}, managed {reach['managed']}")
            text += f"\n- {recipe}, {arm}: " + "; ".join(parts)
    return text + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    recipes = [r for r in report if r not in ("seeds", "ratios", "config", "wall_time_s")]
    fig, axes = plt.subplots(len(recipes), 2, figsize=(12, 4 * len(recipes)), squeeze=False)
    colors = {"fixed": "tab:red", "managed-rules": "tab:blue", "managed-llm": "tab:green"}
    for row, recipe in enumerate(recipes):
        panels = (("safe_success", "test safe success"), ("collision_rate", "test collision rate"))
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for arm, d in report[recipe].items():
                for i, (_, run) in enumerate(sorted(d["per_seed"].items())):
                    steps = [p["step"] for p in run["curve"]]
                    vals = [p[key] for p in run["curve"]]
                    ax.plot(steps, vals, color=colors.get(arm), alpha=0.75, lw=1.2, label=arm if i == 0 else None)
                    ax.plot(steps, [p[f"stochastic_{key}"] for p in run["curve"]], color=colors.get(arm), alpha=0.4,
                            lw=1.0, ls="--", label=f"{arm} (stochastic)" if i == 0 else None)
                    for a in run["applied"]:
                        st = a["applied_step"] if a["applied_step"] is not None else a["step"]
                        y = vals[min(range(len(steps)), key=lambda j: abs(steps[j] - st))] if steps else 0.0
                        marker = {"rollback": "x", "stop": "s"}.get(a["action"] or "", "v")
                        ax.plot([st], [y], marker=marker, color=colors.get(arm), ms=7, ls="none")
            ax.set_title(f"{recipe}: {label}")
            ax.set_xlabel("env steps")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.axhline(REACH, color="gray", lw=0.8, ls=":")
                ax.legend(loc="lower right", fontsize=7)
    fig.suptitle("Test scenes: deterministic policy (solid), stochastic policy (dashed); "
                 "▼ change applied, × rollback, ■ stop")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["add_parser", "build_report", "compare", "main", "markdown", "summarize"]
