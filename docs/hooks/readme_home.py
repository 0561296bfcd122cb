"""MkDocs hook: the README is the site's home page.

The README is the front door on GitHub and on the site alike, written once. Its links into the docs are
written for GitHub (``docs/voices.md``); on the site the home page sits inside ``docs/``, so they lose the
prefix. Any other link out of ``docs/`` stays as written, and the strict build rejects it.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

README = Path(__file__).resolve().parents[2] / "README.md"
HOME = "index.md"
_DOCS_LINK = re.compile(r"\]\(docs/")


def on_files(files, config):
    if files.get_file_from_path(HOME) is not None:
        raise PluginError(f"docs/{HOME} exists, but the home page is README.md (docs/hooks/readme_home.py)")
    files.append(File.generated(config, HOME, abs_src_path=str(README)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != HOME:
        return markdown
    return _DOCS_LINK.sub("](", markdown)
