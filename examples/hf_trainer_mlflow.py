"""A Hugging Face ``Trainer`` job that reports to MLflow, managed by atm.

A tiny GPT-2 (built from its config: nothing is downloaded) learns a small synthetic language, with the
Trainer's own linear LR schedule, evaluation every few steps and ``report_to="mlflow"``. atm is the one
callback marked ``# atm``: it attaches when training begins, to the Trainer's optimizer and scheduler
and the model's dropout, and ends training when the manager asks to stop::

    python examples/hf_trainer_mlflow.py --steps 400
    atm-watch --backend mlflow --run <run_id> --policy lm

Prints the run id first. ``--tracking-uri`` defaults to ``sqlite:///examples-mlflow.db``.
"""

from __future__ import annotations

import argparse
import tempfile

import mlflow
import torch
import transformers

import atm  # atm

VOCAB, LENGTH = 48, 32


def sentences(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Counting sequences with a random start and stride: a language with rules a small model can learn."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--tracking-uri", default="sqlite:///examples-mlflow.db")
    p.add_argument("--experiment", default="hf-trainer-mlflow")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (several spin on a busy CPU)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as out:  # the Trainer reports to this run
        print(f"run_id {run.info.run_id}", flush=True)
        training = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=1e-3,
            weight_decay=0.01, lr_scheduler_type="linear", logging_steps=5, eval_strategy="steps",
            eval_steps=args.eval_every, save_strategy="no", report_to=["mlflow"], use_cpu=True,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=model, args=training, train_dataset=sentences(512, seed=1), eval_dataset=sentences(128, seed=2),
            callbacks=[atm.hf_callback()],  # atm
        )
        trainer.train()


if __name__ == "__main__":
    main()
