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
