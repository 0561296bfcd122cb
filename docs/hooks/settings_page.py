"""MkDocs hook: the Configuration page's table, rendered from ``csmserve.config.Settings`` at build time.

Each field gives one row: the setting, its ``CSM_*`` variable, the ``csmserve serve`` flag (read from the
parser the CLI really builds, so a flag the CLI does not offer is never documented), its type with its bounds,
its default and its description. Nothing is written to disk, so the page cannot drift from the code it is
built from. Imports ``csmserve.config`` and ``csmserve.cli`` only: never torch.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

import annotated_types
from mkdocs.exceptions import PluginError

# Document the checkout this site is built from, not whichever csmserve happens to be installed.
SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

PAGE = "configuration.md"
MARKER = "<!-- settings-table -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if markdown.count(MARKER) != 1:
        raise PluginError(f"docs/{PAGE} must hold the marker {MARKER} exactly once (docs/hooks/settings_page.py)")
    return markdown.replace(MARKER, settings_table())


def settings_table() -> str:
    """A Markdown table of every Settings field, in declaration order."""
    from csmserve.config import Settings

    flags = cli_flags()
    rows = [
        "| setting | variable | flag | type | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        flag = flags.get(name)
        rows.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`",
                    f"`CSM_{name.upper()}`",
                    " ".join(f"`{f}`" for f in flag) if flag else "none: environment only",
                    type_text(field.annotation, field.metadata),
                    default_text(name, field.default),
                    cell(field.description or ""),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def cli_flags() -> dict[str, list[str]]:
    """Setting name -> the option strings of the flag ``csmserve serve`` offers for it (none if hidden)."""
    from csmserve.cli import add_settings_flags

    parser = argparse.ArgumentParser(add_help=False)
    add_settings_flags(parser)
    return {
        action.dest: list(action.option_strings)
        for action in parser._actions  # argparse keeps its actions here; there is no public accessor
        if action.option_strings and action.help is not argparse.SUPPRESS
    }


def type_text(annotation, metadata) -> str:
    """``annotation`` in words, with the bounds pydantic enforces (``≥ 1``, ``20–1000``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1
    text = " ".join(filter(None, [kind_text(args[0] if optional else annotation), bound_text(metadata)]))
    return text + (" (optional)" if optional else "")


def kind_text(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin is tuple:
        return "comma-separated list"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def bound_text(metadata) -> str:
    low = high = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"≥ {item.ge}"
        elif isinstance(item, annotated_types.Gt):
            low = f"> {item.gt}"
        elif isinstance(item, annotated_types.Le):
            high = f"≤ {item.le}"
        elif isinstance(item, annotated_types.Lt):
            high = f"< {item.lt}"
    if low and high and low.startswith("≥") and high.startswith("≤"):
        return f"{low[2:]}–{high[2:]}"
    return ", ".join(b for b in (low, high) if b)


def default_text(name: str, default) -> str:
    if default is None:
        return "unset"
    if default == ():
        return "empty"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    text = f"`{default}`"
    if name.endswith("_bytes") and isinstance(default, int) and default >= 1024:
        text += f" ({human_bytes(default)})"
    return text


def human_bytes(count: int) -> str:
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            return f"{count:g} {unit}"
    return f"{count:g} TiB"


def cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
