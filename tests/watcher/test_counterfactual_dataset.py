"""The counterfactual dataset's labels, loader and scoring, on lines written by hand."""

from __future__ import annotations

import gzip
import json

import pytest

from atm.watcher.counterfactual import (
    BASELINES,
    NOOP,
    DatasetError,
    Move,
    chosen_key,
    label_moves,
    load_dataset,
    make_line,
    score_dataset,
    select,
    write_dataset,
)
from atm.watcher.rules import RulesProposer


def _overfit_line(split: str = "test"):
    """A run whose val loss rose for 8 evaluations from its best while the train loss fell."""
    val = [(s, 1.0 - 0.05 * i) for i, s in enumerate(range(10, 110, 10))]
    val += [(s, 0.5 + 0.03 * i) for i, s in enumerate(range(110, 200, 10), start=1)]
    train = [(s, 1.0 - 0.0045 * s) for s, _ in val]
    outcomes = {
        NOOP: (Move(), [0.85, 0.87, 0.86]),
        "lr=0.0005": (Move(changes={"lr": 0.0005}), [0.80, 0.81, 0.79]),
        "lr=0.002": (Move(changes={"lr": 0.002}), [0.95, 0.97, 0.99]),
        "stop": (Move(action="stop"), [0.77, 0.77, 0.77]),
        "rollback": (Move(action="rollback"), [0.55, 0.56, 0.54]),
    }
    return make_line(outcomes=outcomes, ceiling=10.0, family="toy", run="overfit", condition="overfitting",
                     split=split, point=0, policy="lm", step=190, history={"train_loss": train, "val_loss": val},
                     params={"lr": 0.001, "weight_decay": 0.0, "dropout": 0.0}, horizon=50, seeds=3)


def test_labels_compare_each_move_with_noop_beyond_the_seeds_spread() -> None:
    per_move, labels = label_moves({NOOP: [1.0, 1.02], "a": [0.5, 0.52], "b": [1.01, 1.0], "c": [2.0, 2.02],
                                    "d": [0.51, 0.53]})
    # Pooled over the moves: the mean of their per-move variances.
    assert labels.noise == pytest.approx((0.00017) ** 0.5, rel=1e-6)
    assert per_move == {NOOP: "neutral", "a": "helped", "b": "neutral", "c": "hurt", "d": "helped"}
    assert labels.best == ["a"] and labels.acceptable == ["a", "d"] and labels.harmful == ["c"]
    with pytest.raises(ValueError, match="no-op"):
        label_moves({"a": [1.0, 2.0]})


def test_a_return_is_labelled_and_scored_larger_is_better() -> None:
    per_move, labels = label_moves({NOOP: [100.0, 102.0], "up": [200.0, 202.0], "down": [10.0, 12.0]},
                                   higher_is_better=True)
    assert per_move == {NOOP: "neutral", "up": "helped", "down": "hurt"}
    assert labels.best == ["up"] and labels.harmful == ["down"]
    # A PPO run whose held-out return fell from its best at the last evaluation: early stopping stops it.
    # 22 evaluations: the rl-ppo preset counts a return's points as evaluations from the 20th on.
    ret = [(1000 * i, 5.0 * i) for i in range(1, 22)] + [(22_000, 60.0)]
    line = make_line(
        outcomes={NOOP: (Move(), [100.0, 120.0, 110.0]), "stop": (Move(action="stop"), [60.0] * 3),
                  "lr=0.0006": (Move(changes={"lr": 6e-4}), [190.0, 200.0, 210.0])},
        ceiling=0.0, higher_is_better=True, family="toy", run="ppo", condition="lr_too_high", split="train",
        point=0, policy="rl-ppo", step=22_000, history={"eval/mean_reward": ret}, params={"lr": 3e-4},
        horizon=4096, seeds=3)
    stop = score_dataset(BASELINES["stop-at-first-rise"](), [line]).decisions[0]
    assert stop.move == "stop" and stop.harmful and stop.regret == pytest.approx(140 / line.labels.noise, abs=1e-3)
    noop = score_dataset(BASELINES["always-noop"](), [line]).decisions[0]
    assert noop.regret == pytest.approx(90 / line.labels.noise, abs=1e-3) and not noop.acceptable


def test_a_success_rate_is_not_read_finer_than_one_episode(tmp_path) -> None:
    # A stalled arm: every move scores 0 successes in 36 scenes on every seed, one move a single success
    # on one seed. The moves' pooled spread is near 0: without the outcome's resolution that one
    # episode read as 4 spreads of help.
    outcomes = {NOOP: [0.0] * 3, "clip_range=0.1": [0.0] * 3, "n_epochs=1": [0.0] * 3, "lr=0.0001": [1 / 36, 0.0, 0.0]}
    assert label_moves(outcomes, higher_is_better=True)[0]["lr=0.0001"] == "helped"
    per_move, labels = label_moves(outcomes, higher_is_better=True, resolution=1 / 36)
    assert set(per_move.values()) == {"neutral"} and labels.noise == pytest.approx(1 / 36)
    assert labels.best == ["lr=0.0001"] and NOOP in labels.acceptable

    line = make_line(outcomes={k: (Move(changes={"lr": 1e-4}) if k.startswith("lr") else Move(), v)
                               for k, v in outcomes.items() if k in (NOOP, "lr=0.0001")},
                     ceiling=0.0, higher_is_better=True, resolution=1 / 36, family="toy", run="arm",
                     condition="stalled", split="test", point=0, policy="rl-ppo", step=81920,
                     history={"eval/safe_success": [(20480 * i, 0.0) for i in range(1, 5)]}, params={"lr": 3e-5},
                     horizon=16384, seeds=3)
    assert line.moves[1].label == "neutral"
    write_dataset([line, _overfit_line()], tmp_path / "d.jsonl")
    text = (tmp_path / "d.jsonl").read_text().splitlines()
    # Kept where it is set; left out of a loss line (the default), whose bytes stay as they were.
    assert '"resolution":' in text[0] and '"resolution"' not in text[1]
    assert load_dataset(tmp_path / "d.jsonl")[0].resolution == pytest.approx(1 / 36)


def test_several_moves_at_once_are_scored_as_their_branch_or_else_their_worst_part() -> None:
    line = _overfit_line()
    assert chosen_key(line, {}) == NOOP
    assert chosen_key(line, {"lr": 0.0005}) == "lr=0.0005"
    assert chosen_key(line, {"lr": 0.002, "action": "rollback"}) == "lr=0.002"
    assert chosen_key(line, {"lr": 0.003}) is None


def test_the_loader_rejects_a_malformed_line_naming_its_number(tmp_path) -> None:
    good = _overfit_line().model_dump(mode="json", exclude_none=True)
    bad_history = {**good, "history": {"val_loss": [[10, "high"]]}}
    bad_move = json.loads(json.dumps(good))
    bad_move["moves"][1]["move"]["changes"] = {"momentum": 0.5}
    for bad, field in ((bad_history, "history"), (bad_move, "momentum")):
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(x) for x in (good, good, bad)) + "\n")
        with pytest.raises(DatasetError, match=rf"d\.jsonl:3: .*{field}"):
            load_dataset(path)
    (tmp_path / "e.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"e\.jsonl:2: not valid JSON"):
        load_dataset(tmp_path / "e.jsonl")


def test_a_gzipped_file_round_trips_and_a_split_is_selected(tmp_path) -> None:
    lines = [_overfit_line("train"), _overfit_line("test")]
    path = write_dataset(lines, tmp_path / "d.jsonl.gz")
    assert gzip.decompress(path.read_bytes()).count(b"\n") == 2
    assert load_dataset(path) == lines
    assert [ln.split for ln in select(lines, "test")] == ["test"]
    with pytest.raises(DatasetError, match="no lines in split"):
        select(lines[:1], "test")


def test_scores_the_rules_and_the_fixed_strategies_on_a_line() -> None:
    line = _overfit_line()
    rules = score_dataset(RulesProposer(), [line])
    assert rules.decisions[0].diagnosis == "overfitting"
    noop = score_dataset(BASELINES["always-noop"](), [line])
    d = noop.decisions[0]
    assert d.move == NOOP and not d.acceptable and d.regret == pytest.approx((0.86 - 0.55) / line.labels.noise, rel=1e-3)
    assert noop.summary.noop_precision == 0.0 and noop.summary.noop_recall is None
    halve = score_dataset(BASELINES["always-halve-lr"](), [line]).decisions[0]
    assert halve.move == "lr=0.0005"
    stop = score_dataset(BASELINES["stop-at-first-rise"](), [line]).decisions[0]
    assert stop.move == "stop" and not stop.harmful


def test_atm_eval_dataset_prints_the_proposer_beside_the_fixed_strategies(tmp_path, capsys) -> None:
    import argparse

    from atm.watcher.evaluate import add_eval_parser

    ap = argparse.ArgumentParser(prog="atm")
    add_eval_parser(ap.add_subparsers())
    path = write_dataset([_overfit_line("train"), _overfit_line("test")], tmp_path / "d.jsonl")
    args = ap.parse_args(["eval", "--dataset", str(path), "--split", "test", "--json"])
    assert args.func(args) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["proposer"] for r in reports] == ["rules", *BASELINES]
    assert all(r["summary"]["n"] == 1 and r["split"] == "test" for r in reports)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    args = ap.parse_args(["eval", "--dataset", str(bad)])
    assert args.func(args) == 2
    assert "bad.jsonl:1:" in capsys.readouterr().err


def test_a_follow_up_point_shows_its_earlier_remedy_and_scores_stacking_with_and_without_settle(tmp_path) -> None:
    from pathlib import Path

    from atm.schema import Diagnosis
    from atm.watcher.counterfactual import Earlier

    main = _overfit_line()
    # Two evaluations after an lr cut for the same overfitting: in effect, not yet measured.
    follow = main.model_copy(update={"point": 100, "earlier": [
        Earlier(step=170, effective_step=171, diagnosis=Diagnosis.OVERFITTING, changes={"lr": (0.002, 0.001)})]})
    path = write_dataset([main, follow], tmp_path / "d.jsonl")
    first, second = path.read_text().splitlines()
    assert '"earlier"' not in first and '"earlier"' in second  # a main-run point is written as before
    assert load_dataset(path) == [main, follow]

    settle = score_dataset(RulesProposer(), [main, follow])
    assert [d.follow_up for d in settle.decisions] == [False, True]
    waited = settle.decisions[1]
    assert waited.move == NOOP and not waited.stacked
    assert settle.summary.follow_ups == 1 and settle.summary.stacked == 0
    assert select([main, follow], "all", "follow-ups") == [follow] and select([main, follow], "test", "main") == [main]
    with pytest.raises(DatasetError, match=r"no follow-up points in split 'test'; generate.py --follow-ups"):
        select([main], "test", "follow-ups")

    no_settle = Path(__file__).resolve().parents[2] / "benchmarks" / "policies" / "lm-no-settle.yaml"
    stacked = score_dataset(RulesProposer(), [follow], policy=str(no_settle)).decisions[0]
    assert stacked.diagnosis == "overfitting" and stacked.move != NOOP and stacked.stacked


def test_the_loader_rejects_an_earlier_remedy_after_the_point_or_on_an_unknown_parameter(tmp_path) -> None:
    line = json.loads(_overfit_line().model_dump_json(exclude_none=True))
    late = {**line, "earlier": [{"step": 200, "effective_step": 201, "diagnosis": "overfitting", "changes": {"lr": [1e-3, 5e-4]}}]}
    odd = {**line, "earlier": [{"step": 100, "effective_step": 101, "diagnosis": "overfitting", "changes": {"beta": [1, 2]}}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(late) + "\n" + json.dumps(odd) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1:.*after the point's step"):
        load_dataset(path)
    path.write_text(json.dumps(odd) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1:.*not in `params`"):
        load_dataset(path)


def test_the_shipped_dataset_loads_and_the_rules_decisions_on_it_are_its_branches() -> None:
    # A change to a preset's offer or to the rules that the dataset was not regenerated for shows here:
    # a decision whose moves are no branch of its line cannot be scored.
    from pathlib import Path

    from atm.bench.counterfactual_families import TEST_FAMILIES
    from atm.watcher.proposers import make_proposer

    lines = load_dataset(Path(__file__).resolve().parents[2] / "benchmarks" / "counterfactual" / "dataset.jsonl.gz")
    assert {ln.family for ln in lines if ln.split == "test"} == set(TEST_FAMILIES)
    assert all(ln.resolution > 0 for ln in lines if ln.family == "arm")
    report = score_dataset(make_proposer("rules"), lines)
    assert report.summary.n == len(lines) and report.summary.unmatched == 0


def _with_end(line, ends: dict[str, list[float]], end_step: int = 290):
    moves = [m.model_copy(update={"at_end": ends[m.move.key]}) for m in line.moves]
    return line.model_copy(update={"moves": moves, "end_step": end_step})


def test_a_line_judged_at_the_run_end_is_labelled_from_its_end_outcomes(tmp_path, capsys) -> None:
    import argparse

    from atm.watcher.counterfactual import at_run_end, judged_at
    from atm.watcher.evaluate import add_eval_parser

    # At the horizon a rollback is best; by the run's end the lr cut is, and the rollback no better
    # than no-op (the run overfits again).
    ends = {NOOP: [0.90, 0.91, 0.92], "lr=0.0005": [0.70, 0.71, 0.72], "lr=0.002": [1.2, 1.3, 1.1],
            "stop": [0.77, 0.77, 0.77], "rollback": [0.90, 0.92, 0.91]}
    line = _with_end(_overfit_line(), ends)
    ended = at_run_end(line)
    assert ended.horizon == 100 and ended.end_step is None
    assert ended.labels.best == ["lr=0.0005"] and "rollback" not in ended.labels.acceptable
    assert ended.outcome("rollback").label == "neutral" and line.outcome("rollback").label == "helped"
    assert "lr=0.002" in ended.labels.harmful
    plain = _overfit_line()
    assert judged_at([plain, line], "branch") == [plain, line]
    assert judged_at([plain, line], "end") == [ended], "a line branched to its horizon only is left out"
    with pytest.raises(DatasetError, match="--to-end"):
        judged_at([plain], "end")
    with pytest.raises(DatasetError, match="--to-end"):
        at_run_end(plain)

    path = write_dataset([line, _overfit_line("train")], tmp_path / "d.jsonl")
    assert load_dataset(path)[0] == line
    ap = argparse.ArgumentParser(prog="atm")
    add_eval_parser(ap.add_subparsers())
    args = ap.parse_args(["eval", "--dataset", str(path), "--horizon", "end", "--json"])
    assert args.func(args) == 0
    reports = json.loads(capsys.readouterr().out)
    assert all(r["summary"]["n"] == 1 for r in reports)
    # Halving the lr: not acceptable at the horizon (the rollback was far better), the best at the end.
    halve = next(r for r in reports if r["proposer"] == "always-halve-lr")["decisions"][0]
    assert halve["move"] == "lr=0.0005" and halve["acceptable"] is True and halve["regret"] == 0
    assert score_dataset(BASELINES["always-halve-lr"](), [line]).decisions[0].acceptable is False
    args = ap.parse_args(["eval", "--dataset", str(path), "--split", "train", "--horizon", "end"])
    assert args.func(args) == 2
    assert "--to-end" in capsys.readouterr().err
    # --only that matches nothing says so (it printed empty tables), naming the families there are.
    args = ap.parse_args(["eval", "--dataset", str(path), "--only", "arm/"])
    assert args.func(args) == 2
    assert "no line of split 'all' matches --only arm/; its families are toy" in capsys.readouterr().err


def test_the_loader_rejects_end_outcomes_on_some_moves_only_or_without_their_step(tmp_path) -> None:
    line = _overfit_line()
    some = line.model_copy(update={"moves": [line.moves[0].model_copy(update={"at_end": [1.0, 1.0, 1.0]}),
                                             *line.moves[1:]], "end_step": 290})
    no_step = _with_end(line, {m.move.key: [1.0, 1.0, 1.0] for m in line.moves}).model_copy(update={"end_step": None})
    early = _with_end(line, {m.move.key: [1.0, 1.0, 1.0] for m in line.moves}, end_step=200)
    for bad, says in ((some, "every move needs"), (no_step, "need `end_step`"), (early, "not after the horizon")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(bad.model_dump(mode="json")) + "\n")
        with pytest.raises(DatasetError, match=says) as err:
            load_dataset(path)
        assert "bad.jsonl:1:" in str(err.value)
