"""The container files without a Docker engine: the Dockerfile and compose.yaml read as data, both
linted, and the health-check script run against real servers on loopback."""

from __future__ import annotations

import http.server
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from csmserve.engine.fake import FakeEngine
from support.servers import running_server

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuations joined, comments and parser directives dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def instructions_named(name: str) -> list[str]:
    return [args for keyword, args in dockerfile_instructions() if keyword == name]


def compose_service() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["csmserve"]


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(
            f"{name} is missing from the virtualenv: `pip install -e '.[dev]'` (make test does it)",
            pytrace=False,
        )
    return str(path)


def test_image_starts_from_a_cuda_base_image():
    """The image is built on NVIDIA's CUDA base image (by default; a build arg may change the tag)."""
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert default and default[1].startswith("nvidia/cuda:") and "runtime" in default[1]
    assert instructions_named("FROM") == ["${BASE_IMAGE}"]


def test_torch_is_the_pinned_release_from_the_cuda_index():
    """torch is installed at the project's pinned release from PyTorch's CUDA wheel index."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+$", text, re.M)
    assert any(
        '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in run
        for run in instructions_named("RUN")
    )


def test_container_runs_as_a_non_root_user():
    """The last USER is a numeric non-zero uid, so the server never runs as root."""
    users = instructions_named("USER")
    assert users, "the Dockerfile sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_hugging_face_cache_lives_on_the_data_volume():
    """HF_HOME is /data/hf and /data is a volume, so the model survives a new container."""
    env = " ".join(instructions_named("ENV"))
    assert re.search(r"\bHF_HOME=/data/hf\b", env)
    assert instructions_named("VOLUME") == ['["/data"]']


def test_no_token_is_baked_into_the_image():
    """No ENV or ARG sets a Hugging Face token, and no token-like string appears in the Dockerfile."""
    for keyword, args in dockerfile_instructions():
        if keyword in ("ENV", "ARG"):
            assert "TOKEN" not in args.upper(), args
    assert not re.search(r"hf_[A-Za-z0-9]{8,}", (ROOT / "Dockerfile").read_text())


def test_port_8000_is_exposed():
    """The image declares the server's port."""
    assert instructions_named("EXPOSE") == ["8000"]


def test_healthcheck_runs_the_health_script():
    """HEALTHCHECK runs docker/healthcheck.py (which tries /ready, then /health) with a long start period."""
    [check] = instructions_named("HEALTHCHECK")
    assert '"/app/docker/healthcheck.py"' in check
    assert "--start-period=" in check


def test_entrypoint_is_the_checked_script():
    """The container starts through docker/entrypoint.sh, copied executable into the image."""
    assert instructions_named("ENTRYPOINT") == ['["/app/docker/entrypoint.sh"]']
    assert any(c.startswith("--chmod=0755 docker/entrypoint.sh") for c in instructions_named("COPY"))


def test_every_copied_path_exists_and_is_not_docker_ignored():
    """Each COPY source exists in the repository and .dockerignore does not exclude it."""
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for args in instructions_named("COPY"):
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.split("/")[0] not in ignored, source


def test_dockerfile_passes_hadolint():
    """hadolint finds nothing in the Dockerfile (its settings are in .hadolint.yaml)."""
    result = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_passes_shellcheck_as_posix_sh():
    """shellcheck finds nothing in docker/entrypoint.sh, checked as POSIX sh."""
    result = subprocess.run(
        [tool("shellcheck"), "--shell=sh", "docker/entrypoint.sh"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_reserves_one_nvidia_gpu():
    """compose.yaml asks the NVIDIA runtime for one GPU."""
    [device] = compose_service()["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def test_compose_keeps_the_data_volume_and_publishes_the_port():
    """compose.yaml mounts a named volume at /data and publishes container port 8000."""
    service = compose_service()
    assert "csm-data:/data" in service["volumes"]
    assert any(str(port).endswith(":8000") for port in service["ports"])


def test_compose_takes_the_token_from_the_environment():
    """HF_TOKEN comes from the shell or .env at start-up; no value is written into compose.yaml."""
    service = compose_service()
    assert service["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
    assert service["env_file"] == [{"path": ".env", "required": False}]


def test_compose_health_check_matches_the_image():
    """compose.yaml runs the same health-check script as the Dockerfile."""
    assert compose_service()["healthcheck"]["test"] == ["CMD", "python", "/app/docker/healthcheck.py"]


def run_healthcheck(base_url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        env={"HEALTHCHECK_URL": base_url},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_healthcheck_passes_on_a_ready_server(fake_server):
    """Against csmserve (which has /ready) the check passes once the model is ready."""
    fake_server.wait_ready()
    assert run_healthcheck(fake_server.http).returncode == 0


def test_healthcheck_fails_while_the_model_loads(settings_factory):
    """While the model loads (/ready 503) the check fails and says which URL answered what."""
    engine = FakeEngine(load_delay_s=3)
    with running_server(settings_factory(engine="fake"), engine) as server:
        result = run_healthcheck(server.http)
    assert result.returncode == 1
    assert "/ready answered 503" in result.stderr


def test_healthcheck_fails_when_nothing_listens():
    """With no server on the port the check fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_healthcheck(f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert "answered nothing" in result.stderr


class ReadyButUnhealthy(http.server.BaseHTTPRequestHandler):
    """A server that has /ready (200) and a failing /health: only a check that prefers /ready passes."""

    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(200 if self.path == "/ready" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_prefers_ready_when_the_server_has_it():
    """When /ready exists its answer decides, not /health's."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReadyButUnhealthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_healthcheck(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0
