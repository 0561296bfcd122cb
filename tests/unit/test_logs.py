"""Log lines as written by ``setup_logging``: secrets redacted, instructions to the reader left readable."""

from __future__ import annotations

import json
import logging

import pytest

from csmserve.engine.csm import OFFLINE_WARNING
from csmserve.logs import request_id, setup_logging

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


def test_a_line_outside_a_request_has_no_request_id_brackets(logged):
    """Start-up and other lines without a request carry no `[None]` and no empty brackets."""
    text = logged("ready: ws://127.0.0.1:8000/ws/generate")
    assert " csmserve.engine.csm: ready: ws://" in text
    assert "[None]" not in text and "[]" not in text


def test_a_line_inside_a_request_names_its_id(logged):
    """While a request is handled, its id follows the logger name in brackets (and in JSON)."""
    token = request_id.set("req-42")
    try:
        text, entry = logged("generating"), json.loads(logged("generating", "json"))
    finally:
        request_id.reset(token)
    assert " csmserve.engine.csm [req-42]: generating" in text
    assert entry["request_id"] == "req-42"


CSM_CONFIG_LOGGER = "transformers.models.csm.configuration_csm"
TOKEN_ID_WARNING = (
    "Model config: pad_token_id must be `None` or an integer within the vocabulary (between 0 and 65631), "
    "got 128002. This may result in unexpected behavior."
)


@pytest.fixture
def root_records():
    """setup_logging as the CLI runs it, with a recorder on the root logger: what reaches the log."""
    from logging.handlers import BufferingHandler

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("info")
    recorder = BufferingHandler(1000)
    root.addHandler(recorder)
    yield recorder.buffer
    root.handlers[:], level = saved
    root.setLevel(level)


def emit(logger_name: str, message: str) -> None:
    """Log ``message`` as the named library logger does, through the root logger's handlers.

    transformers keeps its own handler on its library logger and stops propagation there once it has
    configured itself (any earlier test that loaded a model): propagate through it for the test."""
    chain = [logging.getLogger(logger_name), logging.getLogger(logger_name.split(".")[0])]
    saved = [logger.propagate for logger in chain]
    for logger in chain:
        logger.propagate = True  # the filter sits on the logger itself
    try:
        chain[0].warning(message)
    finally:
        for logger, propagate in zip(chain, saved):
            logger.propagate = propagate


def test_transformers_token_id_config_warning_is_dropped(root_records):
    """CSM's config warning about its text token ids (wrongly checked against the audio vocabulary) is dropped."""
    emit(CSM_CONFIG_LOGGER, TOKEN_ID_WARNING)
    assert [r.getMessage() for r in root_records] == []


def test_other_transformers_warnings_still_reach_the_log(root_records):
    """The filter is narrow: another warning of the same logger, and the same text from another logger, pass."""
    emit(CSM_CONFIG_LOGGER, "Model config: something else is wrong")
    emit("transformers.models.llama.configuration_llama", TOKEN_ID_WARNING)
    assert [r.getMessage() for r in root_records] == ["Model config: something else is wrong", TOKEN_ID_WARNING]
