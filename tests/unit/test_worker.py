"""The batching worker with the fake engine: streams share steps, a slow reader never stalls the batch,
a failed step ends only its streams."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from csmserve.errors import ClientTooSlow, GenerationFailed

TEXT = "A text long enough for a couple of dozen frames of tone."


async def started(**kwargs) -> FakeEngine:
    engine = FakeEngine(**kwargs)
    await engine.start()
    return engine


async def collect(engine, request) -> np.ndarray:
    return np.concatenate([piece async for piece in engine.synthesize(request)])


async def test_simultaneous_streams_are_stepped_together_and_each_gets_its_own_audio():
    """Four requests at once share steps (one step makes a frame for each) and each hears its own tone."""
    engine = await started(frame_delay_s=0.01, max_batch=8)
    try:
        requests = [SynthesisRequest(text=TEXT, speaker_id=i, request_id=str(i)) for i in range(4)]
        audio = await asyncio.gather(*(collect(engine, r) for r in requests))
    finally:
        await engine.close()
    assert max(engine.batch_sizes) == 4
    assert sum(engine.batch_sizes) == 4 * engine.num_frames(requests[0])
    for request, got in zip(requests, audio):
        assert np.array_equal(got, engine.render(request))


async def test_a_reader_that_stops_never_stalls_the_others_and_is_dropped_after_max_lag():
    """A stream whose reader takes nothing sits out the steps; the other stream finishes all its frames,
    and the stalled one ends with slow_client once max_lag_s has passed."""
    engine = await started(frame_delay_s=0.01, max_batch=4, max_lag_s=0.5)
    try:
        stalled = engine.synthesize(SynthesisRequest(text=TEXT * 4, request_id="stalled"))
        await stalled.__anext__()  # one frame, then the reader stops reading
        talker = SynthesisRequest(text=TEXT, request_id="talker")
        audio = await collect(engine, talker)
        assert np.array_equal(audio, engine.render(talker))
        made_while_stalled = engine.frames_made["stalled"]
        assert made_while_stalled <= 1 + engine._worker.max_buffered  # its buffer, no more
        await asyncio.sleep(0.8)  # longer than max_lag_s without reading
        with pytest.raises(ClientTooSlow):
            async for _ in stalled:  # what was buffered, then the error
                pass
        assert engine.capacity().active == 0
    finally:
        await engine.close()


async def test_a_failed_step_ends_its_streams_and_the_engine_serves_the_next_request():
    """An exception in a batched step ends every stream in that step with an error; later requests work."""
    engine = await started(frame_delay_s=0.01, fail_at_frame=3, max_batch=4)
    try:
        results = await asyncio.gather(
            *(collect(engine, SynthesisRequest(text=TEXT, request_id=str(i))) for i in range(2)), return_exceptions=True
        )
        assert all(isinstance(r, GenerationFailed) for r in results)
        engine.fail_at_frame = None
        after = SynthesisRequest(text="Fine now.", request_id="after")
        assert np.array_equal(await collect(engine, after), engine.render(after))
        assert engine.capacity().active == 0
    finally:
        await engine.close()


async def test_closing_the_stream_frees_its_row_at_the_next_step():
    """A consumer that stops (barge-in) frees the row: at most one more frame is made, the slot is free again."""
    engine = await started(frame_delay_s=0.02, max_batch=1)
    try:
        stream = engine.synthesize(SynthesisRequest(text=TEXT * 4, request_id="cut"))
        await stream.__anext__()
        await stream.aclose()
        nxt = SynthesisRequest(text="Next caller.", request_id="next")
        assert np.array_equal(await collect(engine, nxt), engine.render(nxt))  # the only row was freed
        assert engine.frames_made["cut"] <= 1 + engine._worker.max_buffered + 1
    finally:
        await engine.close()


async def test_a_steps_frames_reach_the_event_loop_in_one_hand_over():
    """Eight streams stepped together: the model thread wakes the event loop once per step (counted on the
    loop itself), not once per stream, and each stream still gets its own audio."""
    loop = asyncio.get_running_loop()
    calls = 0
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    engine = await started(frame_delay_s=0.005, max_batch=8)
    try:
        requests = [SynthesisRequest(text=TEXT, speaker_id=i, request_id=str(i)) for i in range(8)]
        gate = asyncio.Event()

        async def one(request):
            await gate.wait()
            return await collect(engine, request)

        tasks = [asyncio.create_task(one(r)) for r in requests]
        await asyncio.sleep(0)
        loop.call_soon_threadsafe = counting
        gate.set()
        audio = await asyncio.gather(*tasks)
    finally:
        loop.call_soon_threadsafe = original
        await engine.close()
    steps = len(engine.batch_sizes)
    assert max(engine.batch_sizes) == 8 and sum(engine.batch_sizes) == 8 * engine.num_frames(requests[0])
    assert calls <= steps + 2  # the steps, and the end of the streams (admissions send nothing)
    assert calls < sum(engine.batch_sizes) / 4
    for request, got in zip(requests, audio):
        assert np.array_equal(got, engine.render(request))
