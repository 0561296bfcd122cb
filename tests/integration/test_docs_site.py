"""The documentation site builds with `mkdocs build --strict`, as `make docs` runs it, without a warning: a broken
link or anchor, a page left out of the nav or a failing hook fails `make test`. Its Configuration page lists
every setting of the code it is built from, and its home page is the README."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from csmserve.cli import ENV_ONLY
from csmserve.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of the project at ``root`` into ``site``; output in ``stdout``."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, printed on every build
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(root / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )


def scratch_copy(tmp_path: Path) -> Path:
    """The docs, README and mkdocs.yml copied to ``tmp_path`` (sources linked), to break on purpose."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "docs", copy / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", "mkdocs.yml"):
        shutil.copy(ROOT / name, copy / name)
    (copy / "src").symlink_to(ROOT / "src")
    return copy


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = build(ROOT, site)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "WARNING" in line or "ERROR" in line] == []
    return site


def test_the_site_builds_strictly_with_every_nav_page(site):
    """The strict build writes a page for each section of the nav."""
    for page in ("api/seed/protocol", "api/openai", "api/elevenlabs", "api/wyoming", "voices", "normalisation",
                 "operations", "configuration", "deploy", "scale-out", "benchmarks", "troubleshooting"):
        assert (site / page / "index.html").is_file(), page


def test_configuration_page_lists_every_setting_with_its_variable_flag_and_default(site):
    """Each Settings field has its row: CSM_* variable, the serve flag (none for keys), its default."""
    html = (site / "configuration" / "index.html").read_text()
    rows = {
        re.search(r"<code>CSM_(\w+)</code>", row).group(1).lower(): row
        for row in re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)
        if "<code>CSM_" in row
    }
    assert set(rows) == set(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name in ENV_ONLY:
            assert flag not in rows[name] and "environment only" in rows[name]
        else:
            assert f"<code>{flag}</code>" in rows[name], name
        if isinstance(field.default, int) and not isinstance(field.default, bool):
            assert f"<code>{field.default}</code>" in rows[name], name
    assert "settings-table" not in html  # the marker was replaced


def test_home_page_is_the_readme_with_its_links_into_the_site(site):
    """The README is the home page; its `docs/...` links point at the site's pages."""
    html = (site / "index.html").read_text()
    assert "<h2 id=\"integrations\">Integrations" in html
    assert 'href="docs/' not in html
    assert 'href="api/elevenlabs/#pipecat"' in html


def test_a_broken_link_fails_the_build(tmp_path):
    """A link to a page that does not exist stops the strict build, naming the link."""
    copy = scratch_copy(tmp_path)
    page = copy / "docs" / "voices.md"
    page.write_text(page.read_text() + "\nSee [the missing page](missing.md).\n")
    result = build(copy, tmp_path / "site")
    assert result.returncode != 0
    assert "missing.md" in result.stdout + result.stderr


def test_a_page_left_out_of_the_nav_fails_the_build(tmp_path):
    """A page under docs/ that the nav does not list stops the strict build."""
    copy = scratch_copy(tmp_path)
    (copy / "docs" / "orphan.md").write_text("# Nobody links here\n")
    result = build(copy, tmp_path / "site")
    assert result.returncode != 0
    assert "orphan.md" in result.stdout + result.stderr


def test_the_settings_hook_renders_without_importing_torch():
    """The hook that renders the Configuration table imports the settings and the CLI, never torch."""
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('settings_page', {str(ROOT / 'docs/hooks/settings_page.py')!r})\n"
        "hook = importlib.util.module_from_spec(spec); spec.loader.exec_module(hook)\n"
        "table = hook.settings_table()\n"
        "print(table.count('`CSM_'), 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(len(Settings.model_fields)), "False"]
