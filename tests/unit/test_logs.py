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


def test_an_access_line_carries_its_request_id_and_its_fields_in_json(capsys):
    """An access line, written after its request's task is gone, still names the request (text and JSON);
    in JSON its fields are an `access` object."""
    from csmserve.server.access import AccessLine
    from csmserve.speech import StreamStats

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        outputs = []
        for fmt in ("text", "json"):
            setup_logging("info", fmt)
            capsys.readouterr()
            line = AccessLine("/ws/generate", "127.0.0.1:5000", "0a1b2c3d", "my voice", chars=12, request_id="r-9")
            line.stats = StreamStats(24000, started=10.0, first_audio=10.25, samples=36000)
            line.end("ok")
            line.end("disconnected")  # once only
            outputs.append(capsys.readouterr().err)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    text, json_text = outputs
    assert text.count("csmserve.access") == 1
    assert ' csmserve.access [r-9]: 127.0.0.1:5000 "/ws/generate" ok key_id=0a1b2c3d voice="my voice" chars=12' in text
    assert "audio_s=1.50 first_audio_ms=250.0" in text
    [entry] = [json.loads(line) for line in json_text.splitlines()]
    assert entry["request_id"] == "r-9" and entry["access"] == {
        "route": "/ws/generate", "request_id": "r-9", "client": "127.0.0.1:5000", "key_id": "0a1b2c3d",
        "voice": "my voice", "chars": 12, "audio_s": 1.5, "first_audio_ms": 250.0, "outcome": "ok",
    }


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
