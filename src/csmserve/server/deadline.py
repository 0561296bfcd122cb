"""One deadline per request (``request_timeout_s``), enforced inside the task that iterates the
engine, so that it cancels generation cleanly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio

from csmserve.errors import DeadlineExceeded


def deadline_exceeded(seconds: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"the request did not finish within {seconds:g} s and was stopped")


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Cancel the enclosed streaming after ``seconds`` and raise :class:`DeadlineExceeded` instead.
    Never around a ``yield``: the cancel scope must be entered and left by the same task."""
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise deadline_exceeded(seconds) from None
