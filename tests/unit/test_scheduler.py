"""The scheduler's plan, in plain data: slots, prefill chunks under a budget, decode rows, prefix placement."""

from __future__ import annotations

from csmserve.engine.scheduler import Piece, Row, Scheduler, frame_key, text_key


def key(*ids: int) -> list:
    return [text_key(i) for i in ids]


def test_prefill_chunks_share_one_budget_oldest_prompt_first():
    """Joining prompts are prefilled oldest first, ``chunk`` positions per step in all, never past a prompt's end."""
    scheduler = Scheduler(max_batch=4, chunk=10)
    a, b, c = Row("a"), Row("b"), Row("c")
    scheduler.place(a, Piece(length=6, max_frames=5))
    scheduler.place(b, Piece(length=30, max_frames=5))
    scheduler.place(c, Piece(length=3, max_frames=5))
    plan = scheduler.plan(lambda row: True)
    assert [(r.stream, start, n) for r, start, n in plan.prefill] == [("a", 0, 6), ("b", 0, 4)]
    for row, start, n in plan.prefill:
        scheduler.prefilled(row, start, n)
    plan = scheduler.plan(lambda row: True)
    assert [(r.stream, start, n) for r, start, n in plan.prefill] == [("b", 4, 10)]
    assert [r.stream for r in plan.decode] == ["a"]


def test_a_row_without_credit_sits_out_but_keeps_its_slot():
    """Decode rows are those the credit check lets through; the others stay placed."""
    scheduler = Scheduler(max_batch=2, chunk=8)
    rows = [Row("fast"), Row("slow")]
    for row in rows:
        scheduler.place(row, Piece(length=0, max_frames=5))
    plan = scheduler.plan(lambda row: row.stream == "fast")
    assert [r.stream for r in plan.decode] == ["fast"]
    assert scheduler.free_slots() == []


def test_a_prompt_goes_to_the_free_slot_that_holds_its_longest_prefix():
    """A freed slot keeps its cache identities; a prompt starting with them lands there and reuses them."""
    scheduler = Scheduler(max_batch=3, chunk=100)
    voice = Row("voice")
    scheduler.place(voice, Piece(length=5, max_frames=2, key=key(1, 2, 3, 4, 5)))
    scheduler.prefilled(voice, 0, 5)
    scheduler.decoded(voice, [7] * 32)
    assert scheduler.cached[voice.slot] == [*key(1, 2, 3, 4, 5), frame_key([7] * 32)]
    scheduler.place(Row("other"), Piece(length=3, max_frames=2, key=key(9, 9, 9)))  # takes slot 1
    scheduler.release(voice)
    again = Row("again")
    reused = scheduler.place(again, Piece(length=6, max_frames=2, key=key(1, 2, 3, 4, 8, 9)))
    assert again.slot == voice.slot and reused == 4
    assert scheduler.prefill_positions == {"computed": 5, "reused": 4}


def test_the_last_prompt_position_is_always_computed():
    """Even a prompt the slot holds whole prefills its last position: its hidden state predicts the first frame."""
    scheduler = Scheduler(max_batch=1, chunk=100)
    first = Row("first")
    scheduler.place(first, Piece(length=4, max_frames=1, key=key(1, 2, 3, 4)))
    scheduler.prefilled(first, 0, 4)
    scheduler.release(first)
    assert scheduler.place(Row("same"), Piece(length=4, max_frames=1, key=key(1, 2, 3, 4))) == 3


def test_reuse_off_or_an_unkeyed_prompt_reuses_nothing():
    """With prefix reuse off, or a prompt without identities, every position is prefilled."""
    scheduler = Scheduler(max_batch=1, chunk=100, reuse=False)
    row = Row("x")
    scheduler.place(row, Piece(length=4, max_frames=1, key=key(1, 2, 3, 4)))
    scheduler.prefilled(row, 0, 4)
    scheduler.release(row)
    assert scheduler.place(Row("y"), Piece(length=4, max_frames=1, key=key(1, 2, 3, 4))) == 0
