"""No merge left its conflict markers in a tracked file (a docs build or an import would not always notice)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKERS = ("<" * 7 + " ", ">" * 7 + " ")


def test_no_tracked_file_holds_a_merge_conflict_marker():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".svg", ".wav", ".safetensors"):
            continue
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        found += [f"{name}:{i + 1}" for i, line in enumerate(lines) if line.startswith(MARKERS)]
    assert not found, found
