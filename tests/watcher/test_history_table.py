"""The `atm history` table's cells."""

from __future__ import annotations

from atm.watcher.report import CELL_CHARS, clip


def test_a_long_reason_is_cut_at_a_word_and_says_where_the_whole_is() -> None:
    short = "val loss 1.2 is 3% above its best"
    assert clip(short) == short
    long = "nothing is restored by the stop: unless the job keeps its best checkpoint itself " * 8
    cut = clip(long)
    assert len(cut) <= CELL_CHARS + 40 and cut.endswith("… (whole: atm history --json)")
    # Whole words only: the cut text is a prefix of the reason ending where a word ended.
    kept = cut.removesuffix(" … (whole: atm history --json)")
    assert long.startswith(kept) and long[len(kept)] == " "


def test_a_change_the_job_left_out_of_an_applied_update_is_marked_not_applied() -> None:
    # Seen on a SAC job: an update with n_epochs (SAC has none) and lr was acknowledged as applied with
    # {"lr": ...} in force; the table showed "n_epochs 10→5" as if it had been made.
    from atm.watcher.report import change_cell

    in_force = {"lr": 6e-4}
    assert change_cell("n_epochs", {"old": 10, "new": 5}, in_force) == "n_epochs 10→5 (not applied)"
    assert change_cell("lr", {"old": 3e-4, "new": 6e-4}, in_force) == "lr 0.0003→0.0006"
    # Nothing reported in force (a record from before the ack, a failed update): no mark.
    assert change_cell("n_epochs", {"old": 10, "new": 5}, {}) == "n_epochs 10→5"
