"""``atm-train tinystories``: train the small GPT on TinyStories-style data, logging to MLflow or W&B."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from atm.training.workloads.tinystories.data import CorpusError
from atm.training.workloads.tinystories.train import (
    HEALTHY,
    HEALTHY_QUICK,
    RECIPES,
    EvalPoint,
    ScriptedIntervention,
    TrainConfig,
    TrainResult,
    early_stop_with_restore,
    train,
)
from atm.training.workloads import announce_run, resolve_tracking_uri

#: ``--quick``: the same recipe on a smaller corpus, model (0.26M parameters) and budget, with the same
#: shape of curve: validation loss bottoms near step 120-140 and about doubles by step 800. 17 to 40 s on
#: one thread of a busy 2-core machine.
QUICK: dict[str, Any] = {"steps": 800, "eval_every": 20, "corpus_kb": 24, "context": 64, "width": 96, "n_layer": 2}

# CLI flag -> TrainConfig field, for the plain ones.
_FIELDS = {
    "recipe": "recipe", "steps": "steps", "eval_every": "eval_every", "batch": "batch", "seed": "seed",
    "data": "data", "corpus_kb": "corpus_kb", "data_seed": "data_seed", "lr": "lr",
    "weight_decay": "weight_decay", "dropout": "dropout", "width": "width", "layers": "n_layer",
    "heads": "n_head", "context": "context", "threads": "threads", "tracking": "tracking",
    "tracking_uri": "tracking_uri", "experiment": "experiment", "run_name": "run_name",
    "plateau_factor": "plateau_factor", "plateau_patience": "plateau_patience",
    "early_stop_patience": "early_stop_patience", "warmup_steps": "warmup_steps",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atm-train tinystories",
        description="Train a small GPT-style model on children's stories with atm's listener in place. "
                    "Unset options take the recipe's defaults (or --quick's).",
    )
    p.add_argument("--tracking", choices=["mlflow", "wandb", "none"], default="mlflow",
                   help="tracker to log to (wandb runs offline unless WANDB_MODE says otherwise); "
                        "'none' trains without logging or listening")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite:///atm-demo/mlflow.db); for wandb, the run folder")
    p.add_argument("--experiment", help="MLflow experiment / W&B project (default atm-tinystories)")
    p.add_argument("--run-name")
    p.add_argument("--recipe", choices=RECIPES, help="overfit: the fixed recipe (lr 3e-3, no dropout, no weight "
                                                     "decay); plateau: the same plus ReduceLROnPlateau; healthy: "
                                                     "dropout, weight decay, warm-up then cosine, on a corpus it "
                                                     "cannot memorise (a run to leave alone)")
    p.add_argument("--quick", action="store_true", help="small corpus, model and budget (well under a minute)")
    p.add_argument("--steps", type=int)
    p.add_argument("--eval-every", type=int, help="steps between validation evaluations")
    p.add_argument("--batch", type=int)
    p.add_argument("--seed", type=int, help="training seed (initialisation and batch order)")
    p.add_argument("--data", help="generated (default, offline), hub (roneneldan/TinyStories, needs "
                                  "`pip install datasets`), or a path: .txt file, folder of .txt files, "
                                  "or a datasets save_to_disk folder")
    p.add_argument("--corpus-kb", type=int, help="size of the generated corpus / how much of the hub to read")
    p.add_argument("--data-seed", type=int, help="seed of the generated corpus and of the train/val split")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--context", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default 1: deterministic, leaves room for others)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps before the cosine decay (recipe healthy)")
    p.add_argument("--plateau-factor", type=float)
    p.add_argument("--plateau-patience", type=int)
    p.add_argument("--early-stop-patience", type=int,
                   help="patience (evaluations) for the early-stopping figure in the summary")
    p.add_argument("--no-listen", action="store_true", help="log to the tracker but do not attach atm")
    p.add_argument("--script", action="append", default=[], metavar="STEP:ITEMS",
                   help="a change the job makes itself after the evaluation at STEP, e.g. "
                        "200:rollback,lr=6.7e-4,dropout=0.1,weight_decay=0.1 (repeatable)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the result (curves, summary) as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.recipe == "healthy":
        values.update(HEALTHY, **(HEALTHY_QUICK if args.quick else {}))
    values.update({field: getattr(args, flag) for flag, field in _FIELDS.items() if getattr(args, flag) is not None})
    values["listen"] = not args.no_listen
    values["script"] = [ScriptedIntervention.parse(s) for s in args.script]
    if values["tracking"] == "mlflow":
        values["tracking_uri"] = resolve_tracking_uri(values.get("tracking_uri"))
    return TrainConfig(**values)


def _progress(point: EvalPoint) -> None:
    print(f"step {point.step:5d}  train {point.train_loss:.4f}  val {point.val_loss:.4f}  "
          f"grad {point.grad_norm:6.3f}  lr {point.lr:.2e}  wd {point.weight_decay:g}  "
          f"dropout {point.dropout:g}  ({point.elapsed_s:.1f} s)", flush=True)


def summary(result: TrainResult) -> str:
    cfg = result.config
    es = early_stop_with_restore(result.val_curve, cfg.early_stop_patience, cfg.early_stop_min_delta)
    lines = [
        f"data          {result.data_source}",
        f"model         {result.n_params:,} parameters; recipe {cfg.recipe}, seed {cfg.seed}",
        f"steps         {result.steps_done} of {cfg.steps}" + ("  (stopped by the manager)" if result.stopped_by_manager else ""),
        f"val loss      final {result.final_val_loss:.4f}   best {result.best_val_loss:.4f} at step {result.best_step}",
        f"early stop    {es.final_val_loss:.4f} (patience {cfg.early_stop_patience}: {es.reason})",
        f"interventions {result.interventions} applied, {result.rollbacks} rollbacks",
        f"time          {result.wall_time_s:.1f} s, {result.tokens_per_s:,.0f} tokens/s",
    ]
    if result.run_id:
        where = cfg.tracking_uri or "(default)"
        lines.append(f"run           {cfg.tracking} run {result.run_id} at {where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError and names the field
        print(f"atm-train tinystories: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        where = f" -> {config.tracking_uri}" if config.tracking == "mlflow" else ""
        print(f"tinystories: recipe {config.recipe}, {config.steps} steps, seed {config.seed}, data {config.data}, "
              f"tracking {config.tracking}{where}", flush=True)
    try:
        result = train(config, on_eval=None if args.quiet else _progress,
                       on_start=None if args.quiet else lambda run_id: _started(config, run_id))
    except CorpusError as exc:
        print(f"atm-train tinystories: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(result.model_dump_json(indent=1))
    return 0


def _started(config: TrainConfig, run_id: str | None) -> None:
    wandb_dir = f"{config.tracking_uri}/wandb" if config.tracking == "wandb" and config.tracking_uri else None
    announce_run(run_id, config.tracking, config.tracking_uri, wandb_dir=wandb_dir)


if __name__ == "__main__":
    sys.exit(main())
