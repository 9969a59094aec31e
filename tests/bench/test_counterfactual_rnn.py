"""The recurrent forecaster family: a real LSTM learning, its knobs reaching the model."""

from __future__ import annotations

from torch import nn

from atm.bench.counterfactual_families import TEST_FAMILIES, rnn_job, rnn_recipes
from atm.policies import load_policy
from atm.watcher.snapshot import resolve_roles


def test_the_forecaster_learns_and_its_dropout_knob_reaches_the_embedding_and_the_head() -> None:
    job = rnn_job(n_train=64, opt="adamw", lr=3e-3, dropout=0.1, wd=0.01, schedule="warmup-cosine", warmup=5,
                  total=30)
    before = job.evaluate()
    job.train(30)
    assert job.evaluate() < 0.9 * before  # MSE on the held-out windows, from real steps
    job.apply({"dropout": 0.3, "weight_decay": 0.05})
    drops = [m for m in job.model.modules() if isinstance(m, nn.Dropout)]
    # nn.LSTM's own dropout is no module: the job sees the two it can set, on the embedded steps and the last state.
    assert len(drops) == 2 and all(d.p == 0.3 for d in drops)
    assert job.params()["dropout"] == 0.3 and job.params()["weight_decay"] == 0.05


def test_the_family_trains_since_a_rule_was_drawn_from_it_and_its_runs_log_under_names_of_their_own() -> None:
    runs = rnn_recipes()
    assert "rnn" not in TEST_FAMILIES and {r.condition for r in runs} >= {"overfitting", "healthy", "lr_too_high"}
    assert len({(r.train_key, r.val_key) for r in runs}) == len(runs)
    assert len({r.eval_every for r in runs}) == len(runs)
    lm = load_policy("lm")
    for r in runs:  # each a name the preset maps, not taken for a loss component by its patterns
        assert resolve_roles(lm, [r.train_key, r.val_key, "atm/lr"]) == {
            "train_loss": r.train_key, "val_loss": r.val_key, "lr": "atm/lr"}
