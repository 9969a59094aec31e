"""The tabular classifier and autoencoder families: real models learning, knobs reaching them, names
the preset maps, and both held out."""

from __future__ import annotations

import pytest
from torch import nn

from atm.bench.counterfactual import schedule_factor
from atm.bench.counterfactual_families import TEST_FAMILIES, ae_job, ae_recipes, tab_job, tab_recipes
from atm.policies import load_policy
from atm.watcher.snapshot import resolve_roles


@pytest.mark.parametrize("opt", ["adam", "rmsprop"])
def test_the_tabular_classifier_learns_under_the_optimizers_it_adds(opt: str) -> None:
    job = tab_job(n_train=500, opt=opt, lr=3e-3, dropout=0.1, total=60)
    before = job.evaluate()
    job.train(60)
    assert job.evaluate() < 0.95 * before  # cross-entropy on held-out rows, from real steps
    job.apply({"dropout": 0.3, "weight_decay": 1e-3})
    assert all(m.p == 0.3 for m in job.model.modules() if isinstance(m, nn.Dropout))
    assert all(g["weight_decay"] == 1e-3 for g in job.optimizer.param_groups)


def test_the_autoencoder_learns_to_reconstruct_its_images() -> None:
    job = ae_job(n_train=300, opt="adamw", lr=2e-3, total=80)
    before = job.evaluate()
    job.train(80)
    assert job.evaluate() < 0.7 * before


def test_the_step_schedule_cuts_ten_times_at_half_and_three_quarters() -> None:
    assert [schedule_factor("step", s, 800) for s in (0, 399, 400, 599, 600, 799)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_both_families_are_held_out_and_log_under_names_the_preset_maps() -> None:
    assert {"tab", "ae"} <= set(TEST_FAMILIES)
    lm = load_policy("lm")
    for runs in (tab_recipes(), ae_recipes()):
        assert {r.condition for r in runs} >= {"overfitting", "healthy", "plateau"}
        assert len({(r.train_key, r.val_key) for r in runs}) == len(runs)
        for r in runs:
            assert resolve_roles(lm, [r.train_key, r.val_key, "atm/lr"]) == {
                "train_loss": r.train_key, "val_loss": r.val_key, "lr": "atm/lr"}
