"""The engine's waiting line: tenants take free rows in turn, and only live requests count."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import pytest

from csmserve.engine import SynthesisRequest
from csmserve.engine.intake import Intake


@dataclass(eq=False)
class Waiting:
    request: SynthesisRequest
    cancelled: threading.Event = field(default_factory=threading.Event)


def waiting(tenant: str, name: str) -> Waiting:
    return Waiting(SynthesisRequest(text="Hi.", request_id=name, tenant=tenant))


def names(intake: Intake, count: int, rows=lambda tenant: 0) -> list[str]:
    return [intake.get_nowait(rows).request.request_id for _ in range(count)]


def test_tenants_take_turns_whatever_the_order_they_came_in():
    """Six requests of a hog, then two of another tenant: the other's come second and fourth, not last."""
    intake = Intake(maxsize=16)
    for i in range(6):
        intake.put_nowait(waiting("hog", f"h{i}"))
    for i in range(2):
        intake.put_nowait(waiting("other", f"o{i}"))
    assert names(intake, 8) == ["h0", "o0", "h1", "o1", "h2", "h3", "h4", "h5"]


def test_a_tenant_that_arrives_later_goes_before_the_one_just_served():
    """The hog was given the last two rows; the newcomer's request is next, not behind the hog's line."""
    intake = Intake(maxsize=16)
    for i in range(4):
        intake.put_nowait(waiting("hog", f"h{i}"))
    assert names(intake, 2) == ["h0", "h1"]
    intake.put_nowait(waiting("other", "o0"))
    assert names(intake, 3) == ["o0", "h2", "h3"]


def test_the_tenant_with_the_fewest_rows_goes_first():
    """A tenant holding rows waits behind one holding none, even if it queued first."""
    intake = Intake(maxsize=16)
    intake.put_nowait(waiting("hog", "h0"))
    intake.put_nowait(waiting("other", "o0"))
    rows = {"hog": 3, "other": 0}
    assert names(intake, 2, rows.__getitem__) == ["o0", "h0"]


def test_a_cancelled_request_stops_counting_at_once_and_is_never_taken():
    """Cancelling frees its place in the bound immediately; the line skips it."""
    intake = Intake(maxsize=2)
    first, second = waiting("a", "first"), waiting("a", "second")
    intake.put_nowait(first)
    intake.put_nowait(second)
    with pytest.raises(queue.Full):
        intake.put_nowait(waiting("b", "refused"))
    first.cancelled.set()
    assert intake.qsize() == 1
    intake.put_nowait(waiting("b", "third"))
    assert names(intake, 2) == ["second", "third"]
    with pytest.raises(queue.Empty):
        intake.get_nowait()


def test_purge_drops_the_cancelled_requests():
    intake = Intake(maxsize=4)
    entries = [waiting("a", str(i)) for i in range(3)]
    for entry in entries:
        intake.put_nowait(entry)
    entries[0].cancelled.set()
    entries[2].cancelled.set()
    assert intake.purge() == 2
    assert names(intake, 1) == ["1"]
