"""The bag-of-words text classifier family: a real embedding model learning, knobs reaching it, names
the preset maps, and held out."""

from __future__ import annotations

from torch import nn

from atm.bench.counterfactual_families import TEST_FAMILIES, txt_job, txt_recipes
from atm.policies import load_policy
from atm.watcher.snapshot import resolve_roles


def test_the_text_classifier_learns_and_its_knobs_reach_it() -> None:
    job = txt_job(n_train=1000, opt="adam", lr=3e-3, dropout=0.1, total=120)
    before = job.evaluate()
    job.train(120)
    assert job.evaluate() < 0.9 * before  # cross-entropy on held-out documents, from real steps
    job.apply({"dropout": 0.3, "weight_decay": 1e-3})
    assert all(m.p == 0.3 for m in job.model.modules() if isinstance(m, nn.Dropout))
    assert all(g["weight_decay"] == 1e-3 for g in job.optimizer.param_groups)


def test_a_small_set_is_memorised() -> None:
    # The overfitting recipe's premise: the embedding table learns 300 documents' rare words by heart.
    job = txt_job(n_train=300, opt="adam", lr=3e-3, dim=128, width=128, total=300)
    job.train(300)
    train_loss = job.train(20)["loss"]
    assert train_loss < 0.1 and job.evaluate() > 5 * train_loss


def test_the_family_is_held_out_and_logs_under_names_the_preset_maps() -> None:
    assert "txt" in TEST_FAMILIES
    runs = txt_recipes()
    assert {r.condition for r in runs} >= {"overfitting", "healthy"}
    assert len({(r.train_key, r.val_key) for r in runs}) == len(runs)
    lm = load_policy("lm")
    for r in runs:
        assert resolve_roles(lm, [r.train_key, r.val_key, "atm/lr"]) == {
            "train_loss": r.train_key, "val_loss": r.val_key, "lr": "atm/lr"}
