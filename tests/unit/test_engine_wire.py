"""What crosses to the engine process: plain requests (arrays included) and typed errors; what the engine
keeps for a text stream, bounded; and one engine per GPU behind one contract."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from csmserve.engine import Capacity, ContextTurn, Continuation, SynthesisRequest, wire
from csmserve.engine.client import EngineGroup
from csmserve.engine.fake import FakeEngine
from csmserve.engine.worker import ContinuationStore
from csmserve.errors import InvalidRequest, ModelFailed, Overloaded


def test_a_request_with_voice_codes_and_context_audio_arrives_whole():
    """Every field of a SynthesisRequest survives the wire, numpy arrays with their dtype and shape."""
    codes = np.arange(12 * 32, dtype=np.int16).reshape(12, 32)
    audio = np.linspace(-1, 1, 4800, dtype=np.float32)
    request = SynthesisRequest(
        text="Hello there.", speaker_id=3, max_audio_ms=1600, temperature=0.7, top_k=20, seed=2**40, request_id="r1",
        voice=(ContextTurn(1, "A voice.", codes=codes),), context=(ContextTurn(0, "Earlier.", audio=audio),),
        continuation=Continuation(),
    )
    codec = wire.Codec()
    got = codec.inbound(codec.encode(wire.Submit(7, request)))
    assert isinstance(got, wire.Submit) and got.stream == 7
    assert got.request.voice[0].codes.dtype == np.int16 and np.array_equal(got.request.voice[0].codes, codes)
    assert np.array_equal(got.request.context[0].audio, audio)
    assert got.request.continuation == request.continuation
    assert {k: v for k, v in vars(got.request).items() if k not in ("voice", "context")} == {
        k: v for k, v in vars(request).items() if k not in ("voice", "context")}


def test_errors_cross_as_their_own_kind_and_unknown_ones_as_a_generation_failure():
    """The client raises the engine's error class with its message; anything else is generation_failed."""
    for error in (Overloaded("busy"), InvalidRequest("bad text"), ModelFailed("gpu gone")):
        item = wire.error_item(1, error)
        again = wire.error_from(item.error, item.message)
        assert type(again) is type(error) and again.message == error.message
    assert wire.error_from("os.system", "x").code == "generation_failed"
    assert wire.error_item(1, ZeroDivisionError("boom")).error == "GenerationFailed"


def test_a_step_message_carries_frames_and_capacity():
    codec = wire.Codec()
    frame = np.random.default_rng(0).standard_normal(1920).astype(np.float32)
    step = codec.outbound(codec.encode(wire.Step([wire.Item(3, wire.AUDIO, frame.tobytes()), wire.Item(4, wire.END)],
                                                 Capacity(max_batch=8, active=2))))
    assert np.array_equal(np.frombuffer(step.items[0].audio, dtype=np.float32), frame)
    assert step.items[1].kind == wire.END and step.capacity.active == 2


def test_the_continuation_store_keeps_a_streams_state_until_released_and_forgets_the_oldest():
    store = ContinuationStore(limit=2)
    a, b, c = Continuation(), Continuation(), Continuation()
    store.get(a)["codec"] = 1
    store.get(b)["codec"] = 2
    assert store.get(a) == {"codec": 1}  # a is now the most recent
    store.get(c)["codec"] = 3  # over the limit: b, the least recently used, goes
    assert store.get(b) == {} and len(store) == 2
    store.release(a.id)
    assert store.get(a) == {} and store.get(None) == {}


async def test_one_engine_per_gpu_takes_requests_by_free_capacity_and_keeps_a_text_stream_on_one():
    """Two engines behind one contract: simultaneous requests spread over both; a text stream's
    sentences all go to the engine that holds its state; capacity is the sum."""
    engines = [FakeEngine(frame_delay_s=0.01, max_batch=4), FakeEngine(frame_delay_s=0.01, max_batch=4)]
    group = EngineGroup(engines)
    await group.start()
    try:
        assert group.info.ready and group.capacity().max_batch == 8

        async def speak(request):
            return np.concatenate([a async for a in group.synthesize(request)])

        requests = [SynthesisRequest(text=f"Caller {i} says something.", request_id=f"r{i}") for i in range(6)]
        gate = asyncio.Event()

        async def after_gate(request):
            await gate.wait()
            return await speak(request)

        tasks = [asyncio.create_task(speak(r)) for r in requests[:3]] + [asyncio.create_task(after_gate(r)) for r in requests[3:]]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*tasks)
        assert all(engine.batch_sizes for engine in engines)  # both engines generated
        carry = Continuation()
        for sentence in ("One.", "Two.", "Three."):
            await speak(SynthesisRequest(text=sentence, request_id=f"s-{sentence}", continuation=carry))
        holders = [e for e in engines if any(k.startswith("s-") for k in e.frames_made)]
        assert len(holders) == 1 and len([k for k in holders[0].frames_made if k.startswith("s-")]) == 3
        group.release(carry)
    finally:
        await group.close()


def test_a_fake_engine_process_request_before_ready_is_refused():
    """An engine client that is not ready refuses at once (never queues in the dark)."""
    from csmserve.config import Settings
    from csmserve.engine.client import EngineClient
    from csmserve.errors import NotReady

    client = EngineClient(Settings(engine="fake"), "ipc:///nowhere")

    async def ask():
        async for _ in client.synthesize(SynthesisRequest(text="Too soon.")):
            pass

    with pytest.raises(NotReady):
        asyncio.run(ask())


def test_one_engine_process_per_gpu_respects_the_gpus_a_scheduler_gave_us(monkeypatch):
    """Engines are placed on the GPUs this process may use (a scheduler's CUDA_VISIBLE_DEVICES), and one
    GPU (or none) means one engine that inherits what this process sees."""
    from csmserve.config import Settings
    from csmserve.engine import engine_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert engine_devices(Settings(engine="fake", gpus=2)) == ["3", "5"]
    assert engine_devices(Settings(engine="fake", gpus=1)) == [None]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert engine_devices(Settings(engine="fake", gpus=3)) == ["0", "1", "2"]
    assert engine_devices(Settings(engine="fake")) == [None]
