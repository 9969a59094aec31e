"""The TinyStories workload: corpus sources, tokenizer and split, the model, and real (tiny) training runs.

Training runs are real torch steps on a tiny model; the MLflow runs use a real sqlite store.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from atm.training.workloads.tinystories import cli
from atm.training.workloads.tinystories.data import (
    EOS,
    UNK,
    CorpusError,
    WordTokenizer,
    load_corpus,
    prepare,
    split_stories,
    train_val_split,
)
from atm.training.workloads.tinystories.model import GPT, GPTConfig
from atm.training.workloads.tinystories.train import (
    ScriptedIntervention,
    TrainConfig,
    _Checkpoint,
    early_stop_with_restore,
    train,
    warmup_cosine,
)

#: A model and budget small enough for a training run in a second or two.
TINY = dict(corpus_kb=6, width=32, n_layer=1, n_head=2, context=48, batch=8, steps=40, eval_every=10)


# --------------------------------------------------------------------------- data


def test_generated_corpus_is_deterministic_per_seed() -> None:
    a = load_corpus("generated", size_kb=8, seed=0)
    b = load_corpus("generated", size_kb=8, seed=0)
    c = load_corpus("generated", size_kb=8, seed=1)
    assert a.stories == b.stories
    assert a.stories != c.stories
    size = len(a.text.encode())
    assert 8 * 1024 - 2000 < size < 8 * 1024 + 2000
    assert a.source == "generated(seed=0, size_kb=8)"
    assert len(set(a.stories)) > 0.9 * len(a.stories)  # varied, not one template repeated


def test_txt_file_is_split_on_endoftext_or_blank_lines(tmp_path: Path) -> None:
    marked = tmp_path / "marked.txt"
    marked.write_text("One day, Tom ran.\n\nHe was happy.<|endoftext|>\nLily sang.<|endoftext|>")
    corpus = load_corpus(marked)
    assert corpus.stories == ["One day, Tom ran.\n\nHe was happy.", "Lily sang."]
    assert corpus.source == f"txt:{marked.resolve()}"
    assert split_stories("A cat.\n\n\nA dog.\n  \nA fox.") == ["A cat.", "A dog.", "A fox."]


def test_folder_of_txt_files_is_read_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Story three.")
    (tmp_path / "a.txt").write_text("Story one.\n\nStory two.")
    (tmp_path / "sub" / "c.txt").write_text("Story four.")
    (tmp_path / "notes.md").write_text("not a story")
    corpus = load_corpus(tmp_path)
    assert corpus.stories == ["Story one.", "Story two.", "Story three.", "Story four."]
    assert corpus.source.startswith("txt-folder(3 files):")


def test_saved_dataset_folder_is_read_without_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    # The layout datasets' save_to_disk writes: Arrow IPC stream files plus JSON metadata.
    table = pa.table({"text": ["Tom had a ball.", "  ", "Lily had a kite."], "id": [1, 2, 3]})
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if datasets were not installed
    corpus = load_corpus(tmp_path)
    assert corpus.stories == ["Tom had a ball.", "Lily had a kite."]
    assert corpus.source.startswith("saved-dataset:")


def test_bad_sources_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(CorpusError, match="no .txt files"):
        load_corpus(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CorpusError, match="pip install datasets"):
        load_corpus("hub")


class FakeDatasets:
    """Stands in for the ``datasets`` package (not installed here): a hub that streams or is unreachable."""

    def __init__(self, rows: list[dict[str, str]] | None) -> None:
        self.rows = rows

    def load_dataset(self, name: str, split: str, streaming: bool) -> list[dict[str, str]]:
        assert (name, split, streaming) == ("roneneldan/TinyStories", "train", True)
        if self.rows is None:
            raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (fake)")
        return self.rows


def test_hub_streams_up_to_the_size_budget_and_explains_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"text": f"Story {i}. " + "word " * 200} for i in range(50)]  # about 1 KB each
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets(rows))
    corpus = load_corpus("hub", size_kb=3)
    sizes = [len(s.encode()) + 2 for s in corpus.stories]
    assert corpus.stories == [r["text"].strip() for r in rows[: len(sizes)]]
    assert sum(sizes[:-1]) < 3 * 1024 <= sum(sizes)  # stops as soon as the budget is reached
    assert corpus.source.startswith("hub:roneneldan/TinyStories")
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets(None))
    with pytest.raises(CorpusError, match="could not read roneneldan/TinyStories.*--data generated"):
        load_corpus("hub")


def test_tokenizer_round_trips_and_maps_unknown_words() -> None:
    stories = load_corpus("generated", size_kb=8, seed=3).stories
    tok = WordTokenizer.build(stories, min_count=1)
    assert tok.vocab[:2] == [UNK, EOS]
    for story in stories[:20]:
        ids = tok.encode(story)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == story
    assert tok.decode(tok.encode(stories[0] + " Zyxwvut!")) == stories[0] + UNK + "!"
    stream = tok.encode_stories(stories[:2])
    assert stream.dtype == torch.long
    assert (stream == tok.eos_id).nonzero().flatten().tolist() == [len(tok.encode(stories[0])), len(stream) - 1]
    assert WordTokenizer.build(stories, min_count=1).vocab == tok.vocab  # same stories, same ids
    rare = WordTokenizer.build(["I see a cat. I see a cat. I see a dog."], min_count=2)
    assert rare.encode(" a dog.") == [rare.index[" a"], rare.unk_id, rare.index["."]]  # seen once: <unk>


def test_split_is_by_story_disjoint_and_deterministic() -> None:
    stories = [f"Story number {i}." for i in range(40)]
    train, val = train_val_split(stories, 0.2, seed=0)
    assert len(val) == 8 and len(train) == 32
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(stories)
    assert train_val_split(stories, 0.2, seed=0) == (train, val)
    assert train_val_split(stories, 0.2, seed=1)[1] != val
    prepared = prepare(load_corpus("generated", size_kb=8), val_fraction=0.2)
    assert int((prepared.val_ids == 1).sum()) == prepared.n_val_stories  # one <eos> per validation story
    assert int((prepared.train_ids == 1).sum()) == prepared.n_train_stories


# --------------------------------------------------------------------------- model


def test_model_forward_and_runtime_dropout() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context=16, n_layer=2, n_head=2, width=32))
    ids = torch.randint(0, 50, (3, 16))
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    assert logits.shape == (3, 15, 50)
    assert loss is not None and math.isfinite(loss.item())
    assert abs(loss.item() - math.log(50)) < 0.5  # near-uniform predictions at initialisation

    model.train()
    assert model.get_dropout() == 0.0
    assert torch.equal(model(ids)[0], model(ids)[0])
    model.set_dropout(0.3)
    assert model.get_dropout() == 0.3
    ps = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert ps == {0.3}
    assert not torch.equal(model(ids)[0], model(ids)[0])
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])
    with pytest.raises(ValueError, match="dropout must be in"):
        model.set_dropout(1.0)


def test_checkpoint_restore_keeps_current_hyperparameters() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, context=8, n_layer=1, n_head=2, width=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 30, (4, 9))

    def step() -> None:
        opt.zero_grad()
        model(ids[:, :-1], ids[:, 1:])[1].backward()
        opt.step()

    step()
    ckpt = _Checkpoint()
    ckpt.save(model, opt, step=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        step()
    opt.param_groups[0]["lr"] = 3e-3  # the manager's change arrives with the rollback
    opt.param_groups[0]["weight_decay"] = 0.1
    assert ckpt.restore(model, opt)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["weight_decay"] == 0.1
    assert int(opt.state[next(iter(model.parameters()))]["step"]) == 1  # moments from the checkpoint
    assert not _Checkpoint().restore(model, opt)  # nothing saved yet: nothing to restore


# --------------------------------------------------------------------------- early stopping, scripts


def test_early_stop_with_restore_reads_the_curve() -> None:
    curve = [(10, 3.0), (20, 2.0), (30, 1.5), (40, 1.6), (50, 1.7), (60, 1.4), (70, 1.9), (80, 2.5)]
    out = early_stop_with_restore(curve, patience=2)
    assert (out.stopped, out.stop_step, out.best_step, out.final_val_loss) == (True, 50, 30, 1.5)
    out = early_stop_with_restore(curve, patience=3)
    assert (out.stopped, out.stop_step, out.best_step, out.final_val_loss) == (False, 80, 60, 1.4)
    assert early_stop_with_restore(curve, patience=2, min_delta=0.6).best_step == 20
    with pytest.raises(ValueError, match="empty"):
        early_stop_with_restore([], patience=2)


def test_scripted_intervention_parses_the_cli_form() -> None:
    s = ScriptedIntervention.parse("200:rollback,lr=6e-4,dropout=0.1")
    assert (s.step, s.rollback, s.changes) == (200, True, {"lr": 6e-4, "dropout": 0.1})
    assert ScriptedIntervention.parse(s.to_text()) == s
    with pytest.raises(ValueError, match="STEP:item"):
        ScriptedIntervention.parse("rollback")
    with pytest.raises(ValueError, match="scripted changes can set"):
        ScriptedIntervention.parse("5:momentum=0.5")


# --------------------------------------------------------------------------- training runs


def test_tiny_run_learns_and_is_deterministic() -> None:
    cfg = TrainConfig(**TINY, tracking="none")
    first = train(cfg)
    assert [s for s, _ in first.val_curve] == [10, 20, 30, 40]
    assert first.val_curve[-1][1] < first.val_curve[0][1] - 0.5
    assert first.train_curve[-1][1] < first.train_curve[0][1]
    assert first.steps_done == 40 and first.run_id is None and first.interventions == 0
    assert train(cfg).val_curve == first.val_curve  # same seed, same curve: arms are comparable


def test_the_healthy_recipe_warms_up_then_decays_and_the_cli_gives_its_defaults() -> None:
    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    result = train(TrainConfig(**TINY, recipe="healthy", warmup_steps=20, dropout=0.1, tracking="none"))
    lrs = [e.lr for e in result.evals]  # after steps 10, 20, 30, 40
    assert lrs[0] == pytest.approx(3e-3 * 11 / 20) and lrs[1] == pytest.approx(3e-3)
    assert lrs[1] > lrs[2] > lrs[3] >= 3e-4
    config = cli.config_from_args(cli.build_parser().parse_args(["--recipe", "healthy", "--quick", "--tracking", "none"]))
    assert (config.dropout, config.weight_decay, config.warmup_steps, config.corpus_kb) == (0.1, 0.1, 100, 300)
    given = cli.config_from_args(cli.build_parser().parse_args(["--recipe", "healthy", "--dropout", "0.2",
                                                                "--tracking", "none"]))
    assert given.dropout == 0.2 and given.corpus_kb == 600  # what the user gives wins over the recipe's


def test_scripted_rollback_and_changes_apply() -> None:
    script = [ScriptedIntervention.parse("20:rollback,lr=5e-4,dropout=0.2,weight_decay=0.05")]
    result = train(TrainConfig(**TINY, tracking="none", script=script))
    after = result.evals[-1]
    assert (after.lr, after.dropout, after.weight_decay) == (5e-4, 0.2, 0.05)
    assert result.evals[1].lr == 3e-3  # the step-20 point was logged before the change
    assert result.rollbacks == 1 and result.interventions == 1


def test_mlflow_run_logs_params_and_metrics(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    cfg = TrainConfig(**TINY, tracking="mlflow", tracking_uri=mlflow_uri, experiment="tiny", run_name="t1")
    result = train(cfg)
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data_source"] == "generated(seed=0, size_kb=6)"
    assert run.data.params["recipe"] == "overfit" and run.data.params["lr"] == "0.003"
    for key in ("train_loss", "val_loss", "grad_norm", "lr", "weight_decay", "dropout"):
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [10, 20, 30, 40], key
    val = sorted(client.get_metric_history(result.run_id, "val_loss"), key=lambda m: m.step)
    assert [m.value for m in val] == pytest.approx([v for _, v in result.val_curve])


@pytest.mark.slow
def test_listener_applies_a_published_rollback(mlflow_uri: str) -> None:
    """The workload's two-line listener, driven through the real MLflow run by a published update."""
    from mlflow.tracking import MlflowClient

    from atm.adapters.base import ACK_PREFIX
    from atm.adapters.mlflow_backend import MlflowBackend
    from atm.schema import Action, Change, DecisionRecord, Diagnosis, Status
    from atm.training.workloads.tinystories.train import EvalPoint

    backend = MlflowBackend(tracking_uri=mlflow_uri)
    client = MlflowClient(tracking_uri=mlflow_uri)
    run_ids: list[str] = []

    def acked() -> bool:
        return any(k.startswith(ACK_PREFIX) for k in client.get_run(run_ids[0]).data.tags)

    def on_eval(point: EvalPoint) -> None:
        if point.step == 10:
            backend.publish(DecisionRecord(
                run_id=run_ids[0], seq=1, step=10, status=Status.PENDING, source="test",
                diagnosis=Diagnosis.OVERFITTING, action=Action.ROLLBACK,
                changes={"lr": Change(old=3e-3, new=1e-3), "dropout": Change(old=0.0, new=0.1)}))
        if point.step >= 10 and not acked():
            time.sleep(1.5)  # longer than the listener's poll interval: it fetches the update meanwhile

    cfg = TrainConfig(**{**TINY, "steps": 100}, tracking="mlflow", tracking_uri=mlflow_uri, experiment="tiny")
    result = train(cfg, on_eval=on_eval, on_start=run_ids.append)
    assert acked()
    assert result.interventions == 1 and result.rollbacks == 1
    assert result.evals[-1].lr == pytest.approx(1e-3) and result.evals[-1].dropout == pytest.approx(0.1)
    assert result.evals[0].lr == 3e-3


def test_cli_quick_run_without_tracking(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    code = cli.main(["--tracking", "none", "--quick", "--steps", "16", "--eval-every", "8", "--corpus-kb", "6",
                     "--width", "32", "--layers", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "step     8  train" in text and "val loss      final" in text and "early stop" in text
    assert '"val_curve"' in out.read_text()
    assert cli.main(["--tracking", "none", "--data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
