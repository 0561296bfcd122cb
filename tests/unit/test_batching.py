"""Continuous batching: every active stream is stepped together, and each stream's codes and audio are
what it would have got alone (offline checkpoint, float32)."""

from __future__ import annotations

import asyncio
import numpy as np
import pytest
import torch

from csmserve.config import Settings
from csmserve.engine import Continuation, SynthesisRequest
from csmserve.engine.csm import CsmEngine
from csmserve.engine.loading import load_csm
from support.recording import Recording

TEXTS = [
    "Hi.",
    "A somewhat longer sentence, so this prompt has more positions.",
    "Medium length text here.",
    "The last one joins late and runs until its budget ends, which is short.",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_csm(str(tiny_model_dir), "cpu", "float32")


def greedy(loaded):
    """The same weights with greedy generation configs (both stages)."""
    loaded.model.generation_config.do_sample = False
    loaded.model.depth_decoder.generation_config.do_sample = False


async def started(loaded, **overrides) -> tuple[CsmEngine, Recording]:
    overrides = {"max_batch": 4, "prefill_chunk": 8} | overrides
    settings = Settings(device="cpu", dtype="float32", warmup=False, **overrides)
    engine = CsmEngine(settings, loaded=loaded)
    await engine.start()
    recording = Recording(engine._worker.model)
    engine._worker.model = recording
    return engine, recording


async def collect(engine, request, *, stop_after: int | None = None, joined: asyncio.Event | None = None):
    pieces = []
    stream = engine.synthesize(request)
    try:
        async for piece in stream:
            pieces.append(piece)
            if joined is not None and len(pieces) == 1:
                joined.set()
            if stop_after is not None and len(pieces) >= stop_after:
                break
    finally:
        await stream.aclose()
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def requests(seed=None):
    budgets = [3200, 3200, 3200, 6 * 80]  # the last one ends by its budget
    return [
        SynthesisRequest(text=t, max_audio_ms=b, request_id=f"r{i}", seed=seed)
        for i, (t, b) in enumerate(zip(TEXTS, budgets))
    ]


async def run_batched(engine, reqs, cancel_after: dict[str, int]):
    """Start the requests one after another, each joining once the previous one has audio (so they join at
    different steps); ``cancel_after``: request id -> frames after which its client hangs up."""
    tasks = []
    for request in reqs:
        joined = asyncio.Event()
        tasks.append(asyncio.create_task(collect(engine, request, stop_after=cancel_after.get(request.request_id), joined=joined)))
        await asyncio.wait_for(joined.wait(), 60)
    return await asyncio.gather(*tasks)


async def test_batched_greedy_codes_equal_each_requests_solo_codes(loaded):
    """Four greedy requests of different prompt lengths, joining at different steps (one cancelled midway,
    one ended by its budget), generate exactly the codes each generates alone."""
    greedy(loaded)
    engine, recording = await started(loaded)
    try:
        await run_batched(engine, requests(), cancel_after={"r1": 5})
        batched = dict(recording.codes)
        assert max(len(rows) for _, rows in recording.steps) >= 3  # they really shared steps
        recording.codes.clear()
        for request in requests():
            await collect(engine, request)
        solo = dict(recording.codes)
    finally:
        await engine.close()
    assert len(batched["r3"]) == 6  # its budget
    assert 5 <= len(batched["r1"]) < len(solo["r1"])  # cancelled: at most one frame made after the hang-up
    assert batched["r1"] == solo["r1"][: len(batched["r1"])]
    for rid in ("r0", "r2", "r3"):
        assert batched[rid] == solo[rid], rid


async def test_seeded_request_gets_the_same_codes_alone_and_in_a_batch_of_four(tiny_model_dir):
    """Per-row random streams: a seeded request samples the same frames whoever shares its steps."""
    loaded = load_csm(str(tiny_model_dir), "cpu", "float32")
    engine, recording = await started(loaded)
    try:
        alone = await collect(engine, requests(seed=11)[2])
        solo_codes = list(recording.codes["r2"])
        recording.codes.clear()
        reqs = requests(seed=11)
        reqs = [SynthesisRequest(text=r.text, max_audio_ms=r.max_audio_ms, request_id=r.request_id, seed=s)
                for r, s in zip(reqs, (5, 6, 11, 7))]
        outputs = await asyncio.gather(*(collect(engine, r) for r in reqs))
    finally:
        await engine.close()
    assert recording.codes["r2"] == solo_codes
    # The codec's batched convolutions may round differently from a batch of one: equal within float32 noise.
    assert outputs[2].shape == alone.shape and np.abs(outputs[2] - alone).max() < 1e-4
    assert outputs[0].shape != outputs[2].shape or not np.array_equal(outputs[0], outputs[2])


async def test_each_rows_streamed_audio_equals_its_one_shot_decode(loaded):
    """Through joins and leaves of the codec batch, a row's streamed audio is the one-shot Mimi decode of its codes."""
    greedy(loaded)
    engine, recording = await started(loaded)
    try:
        audio = await run_batched(engine, requests(), cancel_after={"r0": 3})
    finally:
        await engine.close()
    codec = loaded.model.codec_model
    for request, streamed in zip(requests(), audio):
        received = len(streamed) // 1920  # the cancelled one may have made a frame nobody took
        codes = torch.tensor(recording.codes[request.request_id][:received]).T[None]  # (1, 32, frames)
        with torch.inference_mode():
            reference = codec.decode(codes).audio_values[0, 0].float()
        assert streamed.shape == reference.shape
        assert np.abs(streamed - reference.numpy()).max() < 1e-4


async def test_a_long_prompt_joins_in_chunks_without_stopping_the_others(loaded):
    """While a long prompt is prefilled chunk by chunk, the stream already talking gets a frame every step."""
    greedy(loaded)
    engine, recording = await started(loaded)
    try:
        talking = SynthesisRequest(text="Talking already.", max_audio_ms=4000, request_id="talking")
        long_text = "This prompt is long: " + "many words follow, " * 12
        joining = SynthesisRequest(text=long_text, max_audio_ms=400, request_id="joining")
        joined = asyncio.Event()
        first = asyncio.create_task(collect(engine, talking, joined=joined))
        await asyncio.wait_for(joined.wait(), 60)
        await collect(engine, joining)
        await first
    finally:
        await engine.close()
    prefill_steps = [rows for prefilled, rows in recording.steps if prefilled == "joining"]
    assert len(prefill_steps) >= 5  # the prompt took several chunks of 8 positions
    assert all("talking" in rows for rows in prefill_steps)


async def test_a_text_stream_continues_its_codec_state_across_requests(loaded):
    """Two requests of one text stream (a Continuation) decode as one utterance: no seam between them."""
    greedy(loaded)
    engine, recording = await started(loaded)
    carry = Continuation()
    try:
        first = await collect(engine, SynthesisRequest(text="First part.", max_audio_ms=480, request_id="a", continuation=carry))
        second = await collect(engine, SynthesisRequest(text="Second part.", max_audio_ms=480, request_id="b", continuation=carry))
    finally:
        await engine.close()
    codes = torch.tensor(recording.codes["a"] + recording.codes["b"]).T[None]
    with torch.inference_mode():
        reference = loaded.model.codec_model.decode(codes).audio_values[0, 0].float().numpy()
    assert np.abs(np.concatenate([first, second]) - reference).max() < 1e-4


async def test_capacity_reports_rows_and_steps(loaded):
    """capacity() counts active rows and free slots while streams run, and steps keep counting."""
    engine, _ = await started(loaded)
    try:
        before = engine.capacity()
        seen = []

        async def watch():
            async for _ in engine.synthesize(SynthesisRequest(text="Watch me.", max_audio_ms=800)):
                seen.append(engine.capacity())

        await asyncio.gather(watch(), watch())
    finally:
        await engine.close()
    assert before.max_batch == 4 and before.active == 0 and before.free_slots == 4
    assert max(c.active for c in seen) == 2 and min(c.free_slots for c in seen) == 2
    assert seen[-1].steps > before.steps and max(c.last_batch for c in seen) == 2


async def test_alternating_voices_each_reuse_their_own_slots_prefix(loaded):
    """Two voices served at once keep their prompts in two slots: the next request of each voice lands in
    its voice's slot and skips that prefill (one cached prompt for the whole engine would lose one of them)."""
    from csmserve.engine import ContextTurn

    rng = np.random.default_rng(0)
    voices = {name: (ContextTurn(0, f"This is the {name} voice speaking.", codes=rng.integers(0, 2048, (12, 32))),)
              for name in ("alto", "bass")}
    engine, _ = await started(loaded)
    try:
        await asyncio.gather(*(collect(engine, SynthesisRequest(text="First.", voice=v, max_audio_ms=240)) for v in voices.values()))
        before = engine.prefill_positions
        for name in ("alto", "bass"):
            await collect(engine, SynthesisRequest(text="Second, new text.", voice=voices[name], max_audio_ms=240))
        after = engine.prefill_positions
    finally:
        await engine.close()
    voice_positions = 12 + 1  # each voice's frames and its audio_eos frame, after its transcript's tokens
    assert after["reused"] - before["reused"] >= 2 * voice_positions


async def test_a_stream_moved_to_a_lower_slot_keeps_its_codes_sampling_and_audio(loaded):
    """When the rows below it leave, a seeded stream is packed down (its cache, hidden state, sampling
    settings and codec state move with it): its codes are still its solo codes, its audio still the one-shot
    decode of them."""
    engine, recording = await started(loaded)
    try:
        mover = SynthesisRequest(text="I am the one who moves down.", max_audio_ms=2400, request_id="mover", seed=3)
        alone = await collect(engine, mover)
        solo = list(recording.codes["mover"])
        recording.codes.clear()
        joined = [asyncio.Event() for _ in range(3)]
        leavers = [
            asyncio.create_task(collect(engine, SynthesisRequest(text=f"Leaving soon, {i}.", max_audio_ms=4000, request_id=f"l{i}"),
                                        stop_after=4, joined=joined[i]))
            for i in range(2)
        ]
        for event in joined[:2]:
            await asyncio.wait_for(event.wait(), 60)
        moved = await collect(engine, mover)
        await asyncio.gather(*leavers)
    finally:
        await engine.close()
    moves = [copy for copy, rid in recording.copies if rid == "mover"]
    assert moves and moves[-1].dst < moves[0].src
    assert recording.codes["mover"] == solo
    assert moved.shape == alone.shape and np.abs(moved - alone).max() < 1e-4


async def test_callers_joining_together_are_prefilled_in_one_forward_and_hear_audio_in_that_step(loaded):
    """Four requests arriving at once: their prompts are prefilled in the same step, and each one's first
    frame comes in that very step."""
    engine, recording = await started(loaded, prefill_chunk=256)
    try:
        gate = asyncio.Event()
        await engine._worker.call(lambda: None)  # the worker is idle and waiting

        async def caller(i):
            await gate.wait()
            return await collect(engine, SynthesisRequest(text=f"Caller {i} says hi.", max_audio_ms=240, request_id=f"c{i}"))

        tasks = [asyncio.create_task(caller(i)) for i in range(4)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
    finally:
        await engine.close()
    first_prefill = next(group for group in recording.prefilled_together if group)
    assert len(first_prefill) >= 2  # joined in one forward (the first may have been admitted alone)
    for rid in first_prefill:
        step = next(i for i, (_, decoded) in enumerate(recording.steps) if rid in decoded)
        prefill_step = next(i for i, (prefilled, _) in enumerate(recording.steps) if prefilled == first_prefill[0])
        assert step == prefill_step


async def test_start_up_prepares_every_bucket_and_says_how_many_streams_run_in_real_time(tiny_model_dir):
    """Before ready, the engine has run (timed) the step of every bucket up to max_batch; capacity() then
    says how many streams the device holds in real time; a request during loading is refused, not queued."""
    from csmserve.errors import NotReady

    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_load(path, **kwargs):
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        from transformers import CsmForConditionalGeneration

        return CsmForConditionalGeneration.from_pretrained(path, **kwargs)

    settings = Settings(model=str(tiny_model_dir), device="cpu", dtype="float32", warmup=True, max_batch=4)
    engine = CsmEngine(settings, from_pretrained=slow_load)
    starting = asyncio.create_task(engine.start())
    await asyncio.sleep(0.05)
    with pytest.raises(NotReady):
        async for _ in engine.synthesize(SynthesisRequest(text="Too early.")):
            pass
    release.set()
    await asyncio.wait_for(starting, 120)
    try:
        assert engine.info.ready
        assert sorted(int(size) for size in engine.info.extra["step_ms"]) == [1, 2, 4]
        capacity = engine.capacity()
        assert capacity.realtime_streams is not None and 0 <= capacity.realtime_streams <= 4
    finally:
        await engine.close()


async def test_a_request_without_top_k_draws_from_every_id_through_the_engine(tiny_model_dir):
    """The engine path (a piece's settings written when it starts) keeps the step's candidates in step with
    each row's top-k: with every id equally likely and no top-k, a request's codes spread over all 2048 ids,
    not over the 64 candidates of the small variant."""
    flat = load_csm(str(tiny_model_dir), "cpu", "float32")
    with torch.no_grad():  # all logits equal: a draw is uniform over whatever candidates the step keeps
        flat.model.lm_head.weight.zero_()
        flat.model.depth_decoder.codebooks_head.weight.zero_()
    engine, recording = await started(flat)
    try:
        await collect(engine, SynthesisRequest(text="Every id.", max_audio_ms=1600, seed=1, top_k=2048, request_id="all"))
        await collect(engine, SynthesisRequest(text="Fifty ids.", max_audio_ms=1600, seed=1, top_k=50, request_id="few"))
    finally:
        await engine.close()
    spread = {code for frame in recording.codes["all"] for code in frame}
    narrow = {code for frame in recording.codes["few"] for code in frame}
    assert len(spread) > 200 and max(spread) >= 1024
    assert len(narrow) <= 64
