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


def test_a_new_row_takes_the_lowest_free_slot_and_copies_a_prefix_another_slot_holds():
    """Rows always fill the lowest free slot; the prefix a higher slot holds (a voice) is copied there by
    the next step instead of computed, and the copy is in that step's plan before any prefill."""
    scheduler = Scheduler(max_batch=4, chunk=100)
    rows = [Row(name) for name in "abc"]
    for i, row in enumerate(rows):
        scheduler.place(row, Piece(length=3, max_frames=2, key=key(10 * i, 10 * i + 1, 10 * i + 2)))
    voice = rows[2]  # slot 2 holds the voice prompt 20, 21, 22
    for row in rows:
        scheduler.prefilled(row, 0, 3)
    scheduler.plan(lambda row: True)  # drains the step's copies
    scheduler.release(rows[0])  # slot 0 is free again
    again = Row("again")
    reused = scheduler.place(again, Piece(length=5, max_frames=2, key=key(20, 21, 22, 5, 6)))
    assert again.slot == 0 and reused == 3
    plan = scheduler.plan(lambda row: True)
    assert [(c.src, c.dst, c.positions, c.row) for c in plan.copies] == [(voice.slot, 0, 3, None)]
    assert [(r.stream, start, n) for r, start, n in plan.prefill] == [("again", 3, 2)]


def test_rows_are_packed_down_when_the_bucket_would_shrink_and_the_holes_prefix_moves_up():
    """Four of six rows leave: the two top rows move into the lowest holes (their positions, with their state),
    so the step needs a bucket of 2, not 8; the prefix each hole held goes up to the slot its new row left
    (through the spare slot), so nothing cached is lost. No move while the bucket would stay the same."""
    scheduler = Scheduler(max_batch=8, chunk=100)
    rows = [Row(i) for i in range(6)]
    for i, row in enumerate(rows):
        scheduler.place(row, Piece(length=2, max_frames=9, key=key(i, i)))
        scheduler.prefilled(row, 0, 2)
    scheduler.decoded(rows[5], [1] * 32)  # the top row made a frame: 3 positions
    scheduler.plan(lambda row: True)
    scheduler.release(rows[2])
    assert scheduler.plan(lambda row: True).copies == []  # 5 rows in slots 0..5: bucket 8 either way
    for i in (0, 1, 3):
        scheduler.release(rows[i])
    plan = scheduler.plan(lambda row: True)
    spare = 8
    assert [(c.src, c.dst, c.positions, c.row) for c in plan.copies] == [
        (0, spare, 2, None), (5, 0, 3, rows[5]), (spare, 5, 2, None),
        (1, spare, 2, None), (4, 1, 2, rows[4]), (spare, 4, 2, None),
    ]
    assert (rows[5].slot, rows[4].slot) == (0, 1)
    assert scheduler.cached[0][:2] == key(5, 5) and scheduler.cached[1] == key(4, 4)
    assert scheduler.cached[5] == key(0, 0) and scheduler.cached[4] == key(1, 1)
    assert sorted(r.stream for r in plan.decode) == [4, 5]


def test_a_row_whose_prompt_completes_in_the_step_decodes_in_that_step():
    """The plan is fixed up front: a prompt whose last chunk is in this step also makes its first frame in
    it (if its client has room); one that still needs chunks does not."""
    scheduler = Scheduler(max_batch=4, chunk=10)
    short, long = Row("short"), Row("long")
    scheduler.place(short, Piece(length=4, max_frames=5))
    scheduler.place(long, Piece(length=30, max_frames=5))
    plan = scheduler.plan(lambda row: True)
    assert [r.stream for r in plan.decode] == ["short"]
    assert [(r.stream, n) for r, _, n in plan.prefill] == [("short", 4), ("long", 6)]
    waiting = Scheduler(max_batch=1, chunk=10)
    row = Row("no room")
    waiting.place(row, Piece(length=4, max_frames=5))
    assert waiting.plan(lambda row: False).decode == []


def test_a_prompt_reuses_only_its_own_tenants_positions_and_the_shared_ones():
    """The same tokens of another tenant are not a prefix to reuse; shared positions (a registered
    voice's, owner None) are, whoever cached them; a tenant's own generated frames are its own."""
    scheduler = Scheduler(max_batch=2, chunk=100)
    voice = [text_key(i) for i in (1, 2, 3)]
    a = Row("a")
    a_key = [*voice, *(text_key(i, "A") for i in (4, 5, 6))]
    scheduler.place(a, Piece(length=6, max_frames=2, key=a_key, owner="A"))
    scheduler.prefilled(a, 0, 6)
    scheduler.decoded(a, [7] * 32)
    assert scheduler.cached[a.slot][-1] == frame_key([7] * 32, "A")
    b = Row("b")
    b_key = [*voice, *(text_key(i, "B") for i in (4, 5, 6, 8))]
    assert scheduler.place(b, Piece(length=7, max_frames=2, key=b_key, owner="B")) == 3  # the voice only
    assert scheduler.plan(lambda row: True).copies[0].positions == 3
    scheduler.release(a)
    scheduler.release(b)
    a_again = [*voice, *(text_key(i, "A") for i in (4, 5, 6)), frame_key([7] * 32, "A"), text_key(9, "A")]
    assert scheduler.place(Row("a2"), Piece(length=8, max_frames=2, key=a_again, owner="A")) == 7
