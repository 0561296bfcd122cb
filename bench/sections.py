"""docs/benchmarks.md is written by several scripts, each owning one marked section of it."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, start: str, end: str, block: str) -> None:
    """Replace the text from marker ``start`` to marker ``end`` of ``path`` with ``block`` (which holds
    both markers), or append ``block`` when the markers are not there yet."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
