"""Voices (/v1/voices) and conversational context, through real HTTP and WebSocket clients."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf

from csmserve.client import CsmClient, ServerError
from csmserve.engine.fake import FakeEngine
from support.servers import running_server


def clip(fmt: str, seconds: float = 1.5, rate: int = 44100) -> bytes:
    """A real audio file in ``fmt`` (WAV, FLAC, MP3, OGG) at ``rate``."""
    t = np.arange(int(seconds * rate)) / rate
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    buffer = io.BytesIO()
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "MP3": "MPEG_LAYER_III", "OGG": "VORBIS"}[fmt]
    sf.write(buffer, audio, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def register(base: str, data: bytes, name="narrator", transcript="This is how I sound.", speaker_id=3, filename="ref.wav"):
    return httpx.post(
        base + "/v1/voices",
        files={"audio": (filename, data, "application/octet-stream")},
        data={"name": name, "transcript": transcript, "speaker_id": str(speaker_id)},
        timeout=60,
    )


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "MP3", "OGG"])
def test_voice_registers_from_any_common_format_and_rate(fake_server, fmt):
    """A 44.1 kHz clip in WAV/FLAC/MP3/OGG becomes a voice with its frame count at 12.5 Hz."""
    response = register(fake_server.http, clip(fmt), filename=f"ref.{fmt.lower()}")
    assert response.status_code == 201, response.text
    voice = response.json()
    assert voice["name"] == "narrator" and voice["speaker_id"] == 3
    assert voice["transcript"] == "This is how I sound."
    assert abs(voice["frames"] - 1.5 / 0.08) <= 2


def test_voices_are_listed_shown_and_deleted(fake_server):
    """GET lists and shows a voice (csmserve's fields as registration gave them); DELETE removes it; then it is a 404."""
    voice = register(fake_server.http, clip("WAV")).json()
    listed = httpx.get(fake_server.http + "/v1/voices").json()
    assert [v["id"] for v in listed["data"]] == [voice["id"]]
    shown = httpx.get(fake_server.http + f"/v1/voices/{voice['id']}").json()
    assert {key: shown[key] for key in voice} == voice  # csmserve's fields, with ElevenLabs' beside them
    assert shown["voice_id"] == voice["id"]
    assert httpx.delete(fake_server.http + f"/v1/voices/{voice['id']}").json()["deleted"] is True
    assert httpx.get(fake_server.http + f"/v1/voices/{voice['id']}").status_code == 404
    assert httpx.delete(fake_server.http + f"/v1/voices/{voice['id']}").status_code == 404


def test_voices_survive_a_restart_and_corrupt_files_do_not_break_start_up(settings_factory, tmp_path):
    """A new server on the same folder has the voice; a half-written or corrupt file is skipped."""
    settings = settings_factory(engine="fake", voices_dir=tmp_path / "v")
    with running_server(settings, FakeEngine()) as server:
        voice = register(server.http, clip("WAV")).json()
    (tmp_path / "v" / "voice_AAAAAAAAAAAA.json").write_text("{not json")
    (tmp_path / "v" / "voice_BBBBBBBBBBBB.json").write_text(json.dumps({**{k: voice[k] for k in ("name", "speaker_id", "transcript", "frames", "created")}, "id": "voice_BBBBBBBBBBBB"}))
    (tmp_path / "v" / "voice_CCCCCCCCCCCC.npy.tmp").write_bytes(b"half")
    with running_server(settings, FakeEngine()) as server:
        server.wait_ready()
        listed = httpx.get(server.http + "/v1/voices").json()["data"]
    assert [v["id"] for v in listed] == [voice["id"]]
    assert not (tmp_path / "v" / "voice_CCCCCCCCCCCC.npy.tmp").exists()


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        ({"data": b"not audio at all"}, 422, "cannot read the audio file"),
        ({"data": clip("WAV", seconds=31, rate=8000)}, 422, "at most 30 s"),
        ({"data": clip("WAV", seconds=0.2)}, 422, "at least 0.5 s"),
        ({"data": clip("WAV"), "transcript": " "}, 422, "transcript"),
        ({"data": clip("WAV"), "speaker_id": 42}, 422, "speaker_id"),
    ],
)
def test_bad_uploads_get_clear_errors(fake_server, kwargs, status, fragment):
    """Unreadable, too long, too short, or missing fields: a JSON error that says which."""
    data = kwargs.pop("data")
    response = register(fake_server.http, data, **kwargs)
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


def test_oversized_upload_is_a_413(settings_factory):
    """Uploads beyond max_upload_bytes are refused before decoding."""
    with running_server(settings_factory(engine="fake", max_upload_bytes=4096), FakeEngine()) as server:
        response = register(server.http, clip("WAV"))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "upload_too_large"


async def test_unknown_voice_is_an_error_frame(fake_server):
    """A request naming a voice that does not exist ends with invalid_request."""
    async with CsmClient(fake_server.ws) as client:
        with pytest.raises(ServerError) as caught:
            await client.synthesize("Hello.", voice="voice_doesnotexist")
    assert "unknown voice" in caught.value.event["error"]["message"]


async def test_voice_and_context_change_the_csm_output(csm_server):
    """With the offline CSM: the same seed sounds different with a voice, and with a context turn."""
    voice = register(csm_server.http, clip("WAV", seconds=1.0), speaker_id=2).json()
    context_audio = base64.b64encode((np.sin(np.arange(12000) / 9) * 8000).astype("<i2").tobytes()).decode()
    async with CsmClient(csm_server.ws) as client:
        plain = await client.synthesize("Same words.", max_audio_ms=480, seed=5)
        voiced = await client.synthesize("Same words.", max_audio_ms=480, seed=5, voice=voice["id"])
        by_name = await client.synthesize("Same words.", max_audio_ms=480, seed=5, voice="narrator")
        contextual = await client.synthesize(
            "Same words.", max_audio_ms=480, seed=5,
            context=[{"speaker_id": 1, "text": "What did you say?", "audio": context_audio}],
        )
    assert voiced.pcm != plain.pcm
    assert by_name.pcm == voiced.pcm
    assert contextual.pcm != plain.pcm


async def test_long_text_is_spoken_in_sentence_groups_as_one_stream(tiny_model_dir, settings_factory):
    """Text longer than one generation is split at sentences and streamed as one utterance with one done."""
    settings = settings_factory(model=str(tiny_model_dir), device="cpu", dtype="float32", torch_threads=1,
                                max_chars_per_generation=40, ms_per_char=10, min_audio_ms=160)
    text = "The first sentence is here. The second one follows it. A third closes the paragraph."
    with running_server(settings) as server:
        server.wait_ready()
        async with CsmClient(server.ws) as client:
            result = await client.synthesize(text, seed=3)
    assert result.done["samples"] == len(result.pcm) // 2
    # Three groups, each with its own budget of len(text) * 10 ms: 3 + 3 + 3 frames of 80 ms. Unsplit,
    # the 86 characters would have made one 860 ms budget: 10 frames.
    groups = ["The first sentence is here.", "The second one follows it.", "A third closes the paragraph."]
    assert result.done["audio_ms"] == 80 * sum(settings.audio_budget_ms(g) // 80 for g in groups) == 720


async def test_bad_context_is_refused(fake_server):
    """Context turns are validated: base64 audio, speaker range, text."""
    async with CsmClient(fake_server.ws) as client:
        for context, fragment in [
            ([{"speaker_id": 0, "text": "x", "audio": "%%%"}], "not valid base64"),
            ([{"speaker_id": 99, "text": "x"}], "context[0].speaker_id"),
            ([{"speaker_id": 0}], "context[0].text"),
            ("nope", "context must be a list"),
        ]:
            with pytest.raises(ServerError) as caught:
                await client.synthesize("Hi.", context=context)
            assert fragment in caught.value.event["error"]["message"]


def prefill_counts(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("csm_prefill_positions_total{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            counts[kind] = float(line.rsplit(" ", 1)[1])
    return counts


async def test_prefix_reuse_changes_no_sample_and_skips_the_voice_prefill(tiny_model_dir, settings_factory, tmp_path):
    """Same requests, prefix reuse on and off: identical audio; on, the voice and earlier sentences are reused."""
    text = "One voice for every request. It speaks in sentence groups, each hearing the last."
    results, counts = {}, {}
    for reuse in (True, False):
        settings = settings_factory(model=str(tiny_model_dir), device="cpu", dtype="float32", torch_threads=1,
                                    prefix_cache=reuse, voices_dir=tmp_path / f"voices-{reuse}",
                                    max_chars_per_generation=40, ms_per_char=10, min_audio_ms=160)
        with running_server(settings) as server:
            server.wait_ready()
            voice = register(server.http, clip("WAV", seconds=1.0), speaker_id=2).json()["id"]
            before = prefill_counts(server.http)
            async with CsmClient(server.ws) as client:
                results[reuse] = [
                    (await client.synthesize(words, max_audio_ms=ms, seed=5, voice=voice)).pcm
                    for words, ms in (("Hello there.", 480), ("Something else entirely.", 480), (text, 1600))
                ]
            after = prefill_counts(server.http)
            counts[reuse] = {kind: after[kind] - before[kind] for kind in after}
    assert results[True] == results[False]
    assert all(len(pcm) > 0 for pcm in results[True])
    assert counts[False]["reused"] == 0
    # The voice (its transcript, 1 s of frames, audio_eos) is reused by the second request and the third's
    # first sentence group; each later group reuses the one before it with the frames it generated.
    assert counts[True]["reused"] > counts[True]["computed"]
    assert counts[True]["computed"] + counts[True]["reused"] == counts[False]["computed"]
