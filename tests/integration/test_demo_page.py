"""The demo page over HTTP: served at /, its assets from a fixed list, and shipped in the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from csmserve.server.demo import ASSETS

ROOT = Path(__file__).resolve().parents[2]


def test_root_serves_the_demo_page(fake_server):
    """GET / answers the HTML page, which loads its script and has the controls the docs name."""
    response = httpx.get(fake_server.http + "/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for needle in (
        'src="static/demo.js"',
        'id="speak"',
        'id="stop"',
        'id="speaker"',
        'id="api-key"',
        'id="offline-banner"',
        'id="ttfa-client"',
        'id="ttfa-server"',
        'id="rtf"',
    ):
        assert needle in response.text


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_each_asset_is_served_with_its_media_type(fake_server, name):
    """Every asset of the page is served with a JavaScript or CSS media type."""
    response = httpx.get(f"{fake_server.http}/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == ASSETS[name]
    assert response.content == (ROOT / "src/csmserve/static" / name).read_bytes()


@pytest.mark.parametrize("name", ["index.html", "missing.js", "app.py", "__init__.py"])
def test_names_outside_the_asset_list_are_not_found(fake_server, name):
    """Only listed assets are served: any other name is a JSON 404 with code not_found."""
    response = httpx.get(f"{fake_server.http}/static/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "path", ["/static/..%2Fserver%2Fapp.py", "/static/%2Fetc%2Fpasswd", "/static/../__init__.py"]
)
def test_paths_that_leave_the_static_folder_are_not_found(fake_server, path):
    """A path that tries to climb out of static/ is a 404, never the file it names."""
    response = httpx.get(fake_server.http + path)
    assert response.status_code == 404
    assert "import" not in response.text and "root:" not in response.text


def test_wheel_carries_the_page_and_its_assets(tmp_path):
    """A built wheel contains index.html and every asset, so an installed csmserve serves the page."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=project,
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("csmserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"csmserve/static/{name}" for name in ["index.html", *ASSETS]} <= names
