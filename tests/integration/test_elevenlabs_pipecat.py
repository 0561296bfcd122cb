"""pipecat's ElevenLabsTTSService, in a real pipecat pipeline, speaking through csmserve by its URL alone."""

from __future__ import annotations

import asyncio

from pipecat.frames.frames import (
    EndFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
from pipecat.workers.runner import WorkerRunner

from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from support.servers import running_server
from test_elevenlabs_ws import ws_generate_audio

FIRST_TURN = ["Hello there. ", "How are you today? "]
SECOND_TURN = [f"Sentence number {i} is here. " for i in range(8)]


class Recorder(FrameProcessor):
    """The end of the pipeline: keeps every downstream frame (the transport would play the audio)."""

    def __init__(self):
        super().__init__()
        self.frames = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
        await self.push_frame(frame, direction)

    async def wait_for(self, kind, since: int = 0, polls: int = 500):
        for _ in range(polls):
            found = [f for f in self.frames[since:] if isinstance(f, kind)]
            if found:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {kind.__name__} arrived")


async def run_pipeline(tts: ElevenLabsTTSService, script) -> Recorder:
    """Run ``tts`` in a real pipeline while ``script(worker, recorder)`` plays the LLM; it must end the pipeline."""
    recorder = Recorder()
    worker = PipelineWorker(Pipeline([tts, recorder]), cancel_on_idle_timeout=False, params=PipelineParams())
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker, _frame):
        started.set()

    async def play():
        await asyncio.wait_for(started.wait(), 10)
        await script(worker, recorder)

    runner = WorkerRunner()
    await runner.add_workers(worker)
    await asyncio.wait_for(asyncio.gather(runner.run(), play()), 60)
    return recorder


def llm_turn(texts: list[str], end: bool = True) -> list:
    return [LLMFullResponseStartFrame(), *(LLMTextFrame(t) for t in texts), *([LLMFullResponseEndFrame()] if end else [])]


async def speak_one_turn(tts: ElevenLabsTTSService, texts: list[str]) -> list:
    """Run ``tts`` in a pipeline for one LLM turn of ``texts``; every frame that reached the end."""

    async def script(worker, recorder):
        await worker.queue_frames(llm_turn(texts))
        await recorder.wait_for(TTSStoppedFrame)
        await worker.queue_frame(EndFrame())

    return (await run_pipeline(tts, script)).frames


async def test_pipecat_agent_speaks_two_turns_and_is_interrupted_in_the_second(settings_factory):
    """Turn one (LLM text, then its end) is spoken whole, words timed; turn two is interrupted after its first
    audio, and the server stops generating it."""
    engine = FakeEngine(frame_delay_s=0.02)
    with running_server(settings_factory(engine="fake"), engine) as server:
        tts = ElevenLabsTTSService(
            api_key="unused", url=f"ws://127.0.0.1:{server.port}", sample_rate=24000,
            settings=ElevenLabsTTSService.Settings(voice="0"),
        )  # fmt: skip
        second = 0

        async def conversation(worker, recorder):
            nonlocal second
            await worker.queue_frames(llm_turn(FIRST_TURN))
            await recorder.wait_for(TTSStoppedFrame)
            second = len(recorder.frames)
            await worker.queue_frames(llm_turn(SECOND_TURN, end=False))
            await recorder.wait_for(TTSAudioRawFrame, since=second)
            await worker.queue_frame(InterruptionFrame())
            await asyncio.sleep(0.5)
            await worker.queue_frame(EndFrame())

        frames = (await run_pipeline(tts, conversation)).frames
        first_audio = [f for f in frames[:second] if isinstance(f, TTSAudioRawFrame)]
        first_id = first_audio[0].context_id
        assert b"".join(f.audio for f in first_audio) == await ws_generate_audio(server, "".join(FIRST_TURN).strip(), seed=0)
        words = [f.text for f in frames[:second] if isinstance(f, TTSTextFrame)]
        assert words == "Hello there. How are you today?".split()

        second_id = next(f.context_id for f in frames[second:] if isinstance(f, TTSAudioRawFrame))
        made = engine.frames_made[second_id]
        await asyncio.sleep(0.3)
        assert engine.frames_made[second_id] == made  # nothing more generated after the barge-in
        total = sum(engine.num_frames(SynthesisRequest(t.strip(), max_audio_ms=90_000)) for t in SECOND_TURN)
        assert made < total / 2
        assert second_id != first_id


async def test_pipecat_speaks_streamed_llm_text_with_the_offline_csm(csm_server):
    """The real engine (offline checkpoint) behind the same URL: LLM tokens in, CSM audio and timed words out."""
    tts = ElevenLabsTTSService(
        api_key="unused", url=f"ws://127.0.0.1:{csm_server.port}", sample_rate=16000,
        settings=ElevenLabsTTSService.Settings(voice="0"),
    )  # fmt: skip
    tokens = ["Hi", " there", ". How", " are", " you", "?"]
    frames = await speak_one_turn(tts, tokens)
    audio = b"".join(f.audio for f in frames if isinstance(f, TTSAudioRawFrame))
    assert len(audio) >= 2 * 16000 * 0.16  # at least two 80 ms frames at 16 kHz
    assert [f.text for f in frames if isinstance(f, TTSTextFrame)] == ["Hi", "there.", "How", "are", "you?"]
