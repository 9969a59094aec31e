"""The counterfactual generator end to end on tiny runs: branches from checkpoints, labels, the file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atm.bench.counterfactual import Job, Recipe, branch, generate, main_run
from atm.bench.counterfactual_families import mlp_job
from atm.policies import load_policy
from atm.watcher.counterfactual import NOOP, Move, load_dataset, move_key


def _diverging_linear(seed: int) -> Job:
    """Full-batch least squares at an lr just past the stability limit 2/lambda_max: the loss grows by about
    1% a step from the start, so the run is diverging at every decision point and a larger lr only faster."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    lam_max = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())
    model = nn.Linear(4, 1, bias=False)
    return Job(model, torch.optim.SGD(model.parameters(), lr=1.003 * 2 / lam_max),
               sample=lambda _g: (x, y),
               loss=lambda m, b, _w: (F.mse_loss(m(b[0]), b[1]), {}),
               validate=lambda m: float(F.mse_loss(m(x), y)), total=200)


def test_a_branch_setting_lr_to_the_policy_maximum_on_a_diverging_run_is_labelled_hurt(tmp_path) -> None:
    recipe = Recipe("linear", "diverging-sgd", "lr_too_high", _diverging_linear,
                    steps=100, eval_every=10, horizon=20, points=(0.6, 0.9))
    out = tmp_path / "tiny.jsonl.gz"
    lines = generate([(recipe, "train")], out, seeds=2)

    assert [ln.point for ln in lines] == [0, 1]
    assert load_dataset(out) == lines
    to_max_key = move_key({"lr": load_policy("lm").params["lr"].max}, None)
    for ln in lines:
        val = [v for _, v in ln.history["val_loss"]]
        assert val[-1] > val[-2] > val[-3], "the run is diverging at the decision point"
        to_max = ln.outcome(to_max_key)
        assert to_max is not None and to_max.label == "hurt"
        assert to_max_key in ln.labels.harmful and to_max_key not in ln.labels.acceptable
        # Stopping where it is beats letting it diverge further; cutting the lr helps.
        assert ln.outcome("stop").label == "helped"
        assert ln.outcome(move_key({"lr": ln.params["lr"] * 0.5}, None)).label == "helped"


@pytest.mark.slow
def test_the_generator_runs_a_family_end_to_end_and_branches_are_reproducible(tmp_path) -> None:
    recipe = Recipe("mlp", "tiny-overfit", "overfitting",
                    lambda s: mlp_job(n_train=100, opt="adamw", lr=3e-3, width=32, total=120),
                    steps=120, eval_every=10, horizon=20, points=(0.6, 0.9))
    lines = generate([(recipe, "train")], tmp_path / "mlp.jsonl", seeds=2)
    assert len(lines) == 2
    ln = lines[0]
    keys = {m.move.key for m in ln.moves}
    assert {NOOP, "stop", "rollback", "dropout=0.1", "weight_decay=0.05"} <= keys
    assert any(k.startswith("lr=") for k in keys)
    assert set(ln.labels.best) <= set(ln.labels.acceptable)
    # A branch restarts from the checkpoint itself: the same move and seed give the same outcome after
    # other branches ran (an optimizer stepping the checkpoint's own tensors would not).
    job, points, _ = main_run(recipe)
    first = branch(job, points[0], Move(), seed=5, horizon=20)
    branch(job, points[0], Move(changes={"lr": 0.1}), seed=5, horizon=20)
    assert branch(job, points[0], Move(), seed=5, horizon=20) == first


def test_a_follow_up_point_continues_the_rules_remedy_for_two_evaluations_before_branching(tmp_path) -> None:
    from atm.bench.counterfactual import FOLLOW_UP, rules_choice

    recipe = Recipe("mlp", "tiny-overfit", "overfitting",
                    lambda s: mlp_job(n_train=100, opt="adamw", lr=3e-3, width=32, total=140),
                    steps=120, eval_every=10, horizon=20, points=(0.6,))
    out = tmp_path / "fu.jsonl"
    lines = generate([(recipe, "train")], out, seeds=2, follow_ups=True)
    assert [ln.point for ln in lines] == [0, FOLLOW_UP]
    main, follow = lines
    assert load_dataset(out) == lines and not main.earlier

    # The earlier intervention is what the rules applied at the main point, from the values in force there.
    _, points, _ = main_run(recipe)
    proposal, changes = rules_choice(load_policy("lm"), points[0], recipe.run)
    assert changes and proposal.diagnosis.value == "overfitting"
    (earlier,) = follow.earlier
    assert earlier.diagnosis == proposal.diagnosis and earlier.step == main.step
    assert {k: new for k, (_, new) in earlier.changes.items()} == {k: v for k, v in changes.items() if k != "action"}
    assert all(main.params[k] == old for k, (old, _) in earlier.changes.items())
    assert all(follow.params[k] == pytest.approx(new) for k, (_, new) in earlier.changes.items())
    # Its history is the main point's and two more evaluations.
    val = follow.history["val_loss"]
    assert val[:-2] == main.history["val_loss"] and [s for s, _ in val[-2:]] == [main.step + 10, main.step + 20]
    assert follow.step == main.step + 20


def test_an_interrupted_extend_keeps_every_line_the_file_held(tmp_path) -> None:
    # Extending a file with follow-up points: interrupted after the first new line, the file still holds
    # the kept lines of the run being extended and of the runs not reached yet.
    runs = [Recipe("linear", name, "lr_too_high", _diverging_linear, steps=100, eval_every=10, horizon=20, points=(0.6,))
            for name in ("first", "second")]
    out = tmp_path / "d.jsonl"
    kept = generate([(r, "train") for r in runs], out, seeds=2)
    assert [(ln.run, ln.point) for ln in kept] == [("first", 0), ("second", 0)]

    class Interrupted(Exception):
        pass

    def interrupt(msg: str) -> None:
        if "follow-up" in msg:
            raise Interrupted(msg)

    with pytest.raises(Interrupted):
        generate([(r, "train") for r in runs], out, seeds=2, keep=kept, follow_ups=True, progress=interrupt)
    held = {(ln.run, ln.point) for ln in load_dataset(out)}
    assert held == {("first", 0), ("first", 100), ("second", 0)}
    # Extended again without follow-ups, the file keeps the one it has.
    generate([(runs[0], "train")], out, seeds=2, keep=load_dataset(out))
    assert {(ln.run, ln.point) for ln in load_dataset(out)} == held
    # Carried on to the run's end without follow-ups: the main point is branched again, to the end, and
    # the follow-up point stays as it was.
    before = {(ln.run, ln.point): ln for ln in load_dataset(out)}
    generate([(runs[0], "train")], out, seeds=2, keep=load_dataset(out), to_end=True)
    after = {(ln.run, ln.point): ln for ln in load_dataset(out)}
    assert set(after) == held
    assert after[("first", 0)].has_end and not before[("first", 0)].has_end
    assert after[("first", 100)] == before[("first", 100)] and after[("second", 0)] == before[("second", 0)]


def test_warmup_linear_rises_over_the_warmup_then_decays_linearly_to_five_percent() -> None:
    from atm.bench.counterfactual import schedule_factor

    f = [schedule_factor("warmup-linear", s, 110, warmup=10) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(1 - 0.95 * 0.5)
    assert f[110] == pytest.approx(0.05) and f[119] == pytest.approx(0.05)
    assert all(b <= a for a, b in zip(f[10:], f[11:]))
    with pytest.raises(ValueError, match="warmup-linear"):
        schedule_factor("linear-warmup", 0, 10)


def test_the_sequence_family_trains_and_its_dropout_knob_reaches_every_encoder_layer() -> None:
    from atm.bench.counterfactual_families import seq_job

    job = seq_job(n_train=64, opt="adamw", lr=1e-3, dropout=0.1, total=20)
    before = job.evaluate()
    job.train(20)
    assert job.evaluate() < before  # a real model learning from real steps
    job.apply({"dropout": 0.3})
    drops = [m for m in job.model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) >= 6 and all(d.p == 0.3 for d in drops)  # 3 per encoder layer, 2 layers
    assert job.params()["dropout"] == 0.3


def test_branches_carried_to_the_run_end_keep_their_horizon_outcome_and_add_the_end(tmp_path) -> None:
    """--to-end: one branch per seed gives both outcomes; the horizon's are those a horizon-only run
    gives, and the line judged at the end is labelled from the end's."""
    from atm.watcher.counterfactual import at_run_end

    recipe = Recipe("linear", "diverging-sgd", "lr_too_high", _diverging_linear,
                    steps=100, eval_every=10, horizon=20, points=(0.6, 0.9))
    short = generate([(recipe, "train")], tmp_path / "short.jsonl", seeds=2)
    out = tmp_path / "end.jsonl"
    lines = generate([(recipe, "train")], out, seeds=2, to_end=True)
    assert load_dataset(out) == lines
    first, last = lines
    # Point 0 at step 60: the run ends 40 steps on, after the 20-step horizon. Point 1 at step 90: its
    # horizon already reaches past the end, so nothing more is measured there.
    assert (first.step, first.end_step, last.step, last.end_step) == (60, 100, 90, None)
    assert [m.outcomes for m in first.moves] == [m.outcomes for m in short[0].moves]
    assert first.labels == short[0].labels and last == short[1]
    noop = first.outcome(NOOP)
    assert noop.at_end is not None and min(noop.at_end) > max(noop.outcomes), "still diverging at the end"
    assert first.outcome("stop").at_end == first.outcome("stop").outcomes
    ended = at_run_end(first)
    assert ended.horizon == 40 and [m.outcomes for m in ended.moves] == [m.at_end for m in first.moves]
    assert ended.outcome("stop").label == "helped"
    assert move_key({"lr": load_policy("lm").params["lr"].max}, None) in ended.labels.harmful


def test_lines_made_side_by_side_merge_into_the_dataset_and_unchanged_outcomes_are_checked(tmp_path, capsys) -> None:
    import runpy
    from pathlib import Path

    from atm.watcher.counterfactual import write_dataset

    merge = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "counterfactual" / "generate.py"))["merge"]
    recipe = Recipe("linear", "diverging-sgd", "lr_too_high", _diverging_linear,
                    steps=100, eval_every=10, horizon=20, points=(0.6, 0.9))
    base, ends, copy = tmp_path / "base.jsonl.gz", tmp_path / "ends.jsonl", tmp_path / "copy.jsonl"
    short = generate([(recipe, "train")], base, seeds=2)
    made = generate([(recipe, "train")], ends, seeds=2, to_end=True)
    write_dataset(short, copy)
    # A copy of the base listed after the file with the end outcomes does not undo them.
    assert merge(str(base), [str(ends), str(copy)]) == 0
    assert load_dataset(base) == made
    assert "2 lines -> " in (said := capsys.readouterr().out) and "1 given their outcomes at the run's end, 0 added" in said
    # A line whose branches differ from the file's stays as the file has it, and is named.
    write_dataset(short, base)
    moved = made[0].model_copy(update={"moves": [m.model_copy(update={"outcomes": [x + 1 for x in m.outcomes]})
                                                 for m in made[0].moves]})
    write_dataset([moved], ends)
    assert merge(str(base), [str(ends)]) == 0
    assert "their branches differ: diverging-sgd#0" in capsys.readouterr().out
    assert load_dataset(base) == short


def test_relog_gives_old_lines_the_lr_series_the_listener_charts_and_keeps_their_branches(tmp_path) -> None:
    from dataclasses import replace

    from atm.bench.counterfactual import relog

    silent = Recipe("mlp", "tiny-overfit", "overfitting",
                    lambda s: mlp_job(n_train=100, opt="adamw", lr=3e-3, width=32, total=140),
                    steps=120, eval_every=10, horizon=20, points=(0.6,), lr_key=None)
    lines = generate([(silent, "train")], tmp_path / "d.jsonl", seeds=2, follow_ups=True)
    assert [ln.point for ln in lines] == [0, 100] and all("atm/lr" not in ln.history for ln in lines)
    main, fu = relog(replace(silent, lr_key="atm/lr"), lines)
    for old, new in zip(lines, (main, fu)):
        assert new.moves == old.moves and new.labels == old.labels and new.earlier == old.earlier
        assert {k: v for k, v in new.history.items() if k != "atm/lr"} == old.history
    # A constant lr is charted once, at the start; the follow-up point charts the remedy's lr the step
    # after its point, as the listener's ack does.
    assert main.history["atm/lr"] == [(0, 3e-3)]
    (earlier,) = fu.earlier
    assert fu.history["atm/lr"] == [(0, 3e-3), (earlier.step + 1, pytest.approx(earlier.changes["lr"][1]))]
    # A run that no longer logs what a line held is refused: its branches would not be its own.
    with pytest.raises(ValueError, match="branch it again"):
        relog(replace(silent, build=lambda s: mlp_job(n_train=100, opt="adamw", lr=1e-3, width=32, total=140)), lines)


def test_a_scheduled_lr_is_charted_whenever_it_moved_by_more_than_one_percent() -> None:
    recipe = Recipe("mlp", "tiny-warmup", "healthy",
                    lambda s: mlp_job(n_train=100, opt="adamw", lr=3e-3, width=32, total=120,
                                      schedule="warmup-cosine", warmup=40),
                    steps=120, eval_every=10, horizon=20, points=(0.9,))
    _, (point,), _ = main_run(recipe)
    lr = point.history["atm/lr"]
    peak = max(range(len(lr)), key=lambda i: lr[i][1])
    assert lr[0][0] == 0 and lr[0][1] < 3e-4 and 0 < peak < len(lr) - 1 and lr[peak][1] == pytest.approx(3e-3, rel=0.05)
    assert all(b > a for (_, a), (_, b) in zip(lr[: peak + 1], lr[1 : peak + 1]))
    assert all(b < a for (_, a), (_, b) in zip(lr[peak:], lr[peak + 1 :]))
    assert all(abs(b - a) > 0.01 * abs(a) for (_, a), (_, b) in zip(lr, lr[1:]))
