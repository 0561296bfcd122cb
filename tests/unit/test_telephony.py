"""Telephony framing: whole 20 ms µ-law frames in the exact Twilio and Telnyx message shapes."""

from __future__ import annotations

import base64
import json
import random

import pytest

from csmserve.audio.telephony import FRAME_BYTES, FrameAligner, TelnyxFramer, TwilioFramer

SID = "MZ18ad3ab5a668481ce02b83e7395059f0"


def _mulaw(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _random_splits(data: bytes, seed: int) -> list[bytes]:
    rng, pieces, start = random.Random(seed), [], 0
    while start < len(data):
        size = rng.choice([1, 7, 159, 160, 161, 333, 490, 640, 1000])
        pieces.append(data[start : start + size])
        start += size
    return pieces


def _payload(message: str) -> bytes:
    return base64.b64decode(json.loads(message)["media"]["payload"], validate=True)


def test_frame_aligner_emits_whole_frames_and_pads_the_last():
    """Arbitrary splits give 160-byte frames in order; flush pads the remainder with 0xFF."""
    data = _mulaw(1000)
    aligner = FrameAligner()
    frames = [frame for piece in _random_splits(data, 1) for frame in aligner.push(piece)]
    tail = aligner.flush()
    assert all(len(frame) == FRAME_BYTES for frame in frames + tail)
    assert b"".join(frames + tail) == data + b"\xff" * (7 * FRAME_BYTES - 1000)
    assert aligner.flush() == []


def test_twilio_media_message_shape():
    """A whole frame becomes exactly {"event": "media", "streamSid", "media": {"payload"}}."""
    frame = _mulaw(FRAME_BYTES)
    (message,) = TwilioFramer(SID).media(frame)
    assert json.loads(message) == {
        "event": "media",
        "streamSid": SID,
        "media": {"payload": base64.b64encode(frame).decode("ascii")},
    }


def test_twilio_end_pads_the_last_frame_then_marks():
    """end() sends the silence-padded remainder, then the mark, and the mark is the last message."""
    framer = TwilioFramer(SID)
    assert framer.media(_mulaw(100)) == []
    *media, mark = framer.end("utterance-1")
    assert [_payload(m) for m in media] == [_mulaw(100) + b"\xff" * 60]
    assert json.loads(mark) == {"event": "mark", "streamSid": SID, "mark": {"name": "utterance-1"}}


def test_twilio_clear_shape_and_it_drops_the_remainder():
    """clear() is {"event": "clear", "streamSid"}; the held-back partial frame is not sent later."""
    framer = TwilioFramer(SID)
    framer.media(_mulaw(100))
    assert json.loads(framer.clear()) == {"event": "clear", "streamSid": SID}
    assert framer.end() == []


def test_telnyx_message_shapes_have_no_stream_id():
    """Telnyx media, mark and clear are the documented shapes, without stream_id."""
    framer = TelnyxFramer()
    frame = _mulaw(FRAME_BYTES)
    (media,) = framer.media(frame)
    assert json.loads(media) == {"event": "media", "media": {"payload": base64.b64encode(frame).decode()}}
    assert [json.loads(m) for m in framer.end("done")] == [{"event": "mark", "mark": {"name": "done"}}]
    assert json.loads(framer.clear()) == {"event": "clear"}


@pytest.mark.parametrize("framer_type", [TwilioFramer, TelnyxFramer])
@pytest.mark.parametrize("frames_per_message", [1, 3])
@pytest.mark.parametrize("seed", range(5))
def test_nothing_is_lost_across_arbitrary_splits(framer_type, frames_per_message, seed):
    """Payloads are whole frames, at most frames_per_message each, adding up to the input plus padding."""
    data = _mulaw(10_007, seed)
    args = (SID,) if framer_type is TwilioFramer else ()
    framer = framer_type(*args, frames_per_message=frames_per_message)
    messages = [m for piece in _random_splits(data, seed) for m in framer.media(piece)]
    messages += framer.end("last")
    *media, mark = messages
    payloads = [_payload(m) for m in media]
    assert all(len(p) % FRAME_BYTES == 0 and 0 < len(p) <= frames_per_message * FRAME_BYTES for p in payloads)
    assert b"".join(payloads) == data + b"\xff" * (-len(data) % FRAME_BYTES)
    assert json.loads(mark)["event"] == "mark"


def test_frames_go_out_without_waiting_to_fill_a_message():
    """With frames_per_message=4, a single whole frame is still sent at once."""
    (message,) = TwilioFramer(SID, frames_per_message=4).media(_mulaw(FRAME_BYTES))
    assert len(_payload(message)) == FRAME_BYTES


def test_end_without_a_mark_name_sends_only_media():
    """No mark is sent unless it is asked for."""
    framer = TelnyxFramer()
    framer.media(_mulaw(10))
    assert [json.loads(m)["event"] for m in framer.end()] == ["media"]


def test_frames_per_message_must_be_positive():
    """Zero frames per message cannot carry audio."""
    with pytest.raises(ValueError, match="at least 1"):
        TwilioFramer(SID, frames_per_message=0)
