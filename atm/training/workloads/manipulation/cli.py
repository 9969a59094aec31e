"""``atm-train manipulation``: train PPO on the arm-and-obstacle task with one of the paper's recipes."""

from __future__ import annotations

import argparse
import json
import sys

from atm.training.workloads.manipulation.recipes import RECIPES


def _parser() -> argparse.ArgumentParser:
    from atm.training.workloads.manipulation.train import DEFAULT_EVAL_EVERY, DEFAULT_TIMESTEPS, QUICK

    p = argparse.ArgumentParser(
        prog="atm-train manipulation",
        description="Two-link MuJoCo arm reaching around an obstacle, SB3 PPO, held-out evaluation.",
    )
    p.add_argument("--recipe", choices=sorted(RECIPES), default="baseline")
    p.add_argument("--tracking", choices=["mlflow", "wandb", "none"], default="mlflow",
                   help="tracker to log to (wandb runs offline unless WANDB_MODE says otherwise); "
                        "'none' trains without logging")
    p.add_argument("--timesteps", type=int, default=None, help=f"env steps (default {DEFAULT_TIMESTEPS})")
    p.add_argument("--seed", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=None, help=f"env steps (default {DEFAULT_EVAL_EVERY})")
    p.add_argument(
        "--eval-episodes", type=int, default=None, help="held-out scenes per difficulty (default 12)"
    )
    p.add_argument(
        "--quick", action="store_true",
        help=f"a smoke run: {QUICK['timesteps']} steps, evaluation every {QUICK['eval_every']}, "
        f"{QUICK['eval_episodes']} scenes per difficulty",
    )
    p.add_argument(
        "--test-episodes", type=int, default=None,
        help="also run this many test scenes per difficulty at every evaluation; reported in --out, "
        "never logged, so a manager watching the run cannot see them (default: none)",
    )
    p.add_argument("--no-listen", action="store_true", help="do not attach the atm listener")
    p.add_argument("--experiment", default="atm-manipulation", help="MLflow experiment / W&B project")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite:///atm-demo/mlflow.db)")
    p.add_argument("--run-name", help="tracker run name (default manipulation-RECIPE-sSEED)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", help="write the run's summary (every evaluation) to this JSON file")
    p.add_argument("--verbose", action="store_true", help="print SB3's table after every update")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from atm.training.workloads.manipulation.train import QUICK, TrainConfig, train

    settings: dict[str, object] = {}
    if args.quick:
        settings.update(QUICK)
    for key in ("timesteps", "eval_every", "eval_episodes", "test_episodes", "tracking_uri", "run_name"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.tracking == "mlflow":
        from atm.training.workloads import resolve_tracking_uri

        settings["tracking_uri"] = resolve_tracking_uri(args.tracking_uri)
    config = TrainConfig(
        recipe=args.recipe,
        tracking=args.tracking,
        seed=args.seed,
        listen=not args.no_listen,
        experiment=args.experiment,
        torch_threads=args.torch_threads,
        verbose=args.verbose,
        **settings,  # type: ignore[arg-type]
    )
    from atm.training.workloads import announce_run

    result = train(config, on_start=lambda run_id: announce_run(run_id, config.tracking, config.tracking_uri, policy="rl-ppo"))
    final = result.final
    print(
        f"{result.recipe} seed {result.seed}: {result.timesteps} steps in {result.wall_seconds:.0f}s; "
        f"held-out safe success {final.get('eval/safe_success', float('nan')):.2f}, "
        f"collision {final.get('eval/collision_rate', float('nan')):.2f}, "
        f"robust score {final.get('eval/robust_score', float('nan')):+.2f}"
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result.model_dump(), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
