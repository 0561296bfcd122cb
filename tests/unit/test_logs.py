"""Log lines as written by ``setup_logging``: secrets redacted, instructions to the reader left readable."""

from __future__ import annotations

import json
import logging

import pytest

from csmserve.engine.csm import OFFLINE_WARNING
from csmserve.logs import setup_logging

KEY = "sk-live-7f3a9c"
HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


@pytest.fixture
def logged(capsys):
    """Configure logging as the CLI does; return a function that logs a message and gives the stderr text."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def log(message: str, fmt: str = "text") -> str:
        setup_logging("info", fmt)
        capsys.readouterr()
        logging.getLogger("csmserve.engine.csm").warning(message)
        return capsys.readouterr().err

    yield log
    root.handlers[:], level = saved
    root.setLevel(level)


def test_offline_model_banner_keeps_its_export_instruction(logged):
    """The offline-model warning tells the user `export HF_TOKEN=<read token>` word for word."""
    text = logged(OFFLINE_WARNING)
    assert "export HF_TOKEN=<read token>, and restart" in text
    assert "[redacted]" not in text


def test_offline_model_banner_in_json_logs_keeps_its_instruction(logged):
    """The same banner as a JSON log line carries the instruction unchanged."""
    entry = json.loads(logged(OFFLINE_WARNING, "json"))
    assert entry["message"] == OFFLINE_WARNING


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        (f'"GET /generate?token={KEY}&x=1 HTTP/1.1" 200', KEY),
        (f"Authorization: Bearer {KEY}", KEY),
        (f"export HF_TOKEN={HF_TOKEN}", HF_TOKEN),
        (f"the hub refused {HF_TOKEN} (401)", HF_TOKEN),
        (f"?token=<{KEY}", KEY),
    ],
)
def test_credentials_are_redacted(logged, line, secret):
    """Keys in query strings, bearer headers and Hugging Face tokens anywhere never reach the log."""
    text = logged(line)
    assert secret not in text and "[redacted]" in text
