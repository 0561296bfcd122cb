"""The lead rule without sockets: a fake delivery stands for the connection (bytes written, bytes
not yet acknowledged), :class:`StreamStats` for the stream's audio position."""

from __future__ import annotations

import asyncio

import pytest

from csmserve.errors import ClientTooSlow
from csmserve.server.pacing import Pacer
from csmserve.speech import StreamStats

RATE = 8000  # one byte a sample: mu-law at 8 kHz


class FakeDelivery:
    """``written`` bytes, the last ``pending`` of which the client has not acknowledged."""

    def __init__(self):
        self.written = 0
        self.pending = 0

    def unacknowledged(self) -> int:
        return self.pending

    async def send(self, pacer: Pacer, stats: StreamStats, seconds: float) -> None:
        """As a route sends: wait for room, then the sink made ``seconds`` of audio and one item of its
        bytes was written (not yet acknowledged)."""
        await pacer.wait(stats)
        size = int(seconds * RATE)
        stats.samples += size
        self.written += size
        self.pending += size
        pacer.sent(stats)


async def test_a_client_that_reads_nothing_stops_the_stream_at_the_lead_and_is_cut_after_the_lag():
    """A stream sends while its unacknowledged audio is within max_lead_s; then waits, and a wait of
    max_lag_s with nothing taken is ClientTooSlow."""
    delivery, stats = FakeDelivery(), StreamStats(RATE)
    pacer = Pacer(delivery, max_lead_s=1.0, max_lag_s=0.1)
    sent = 0
    with pytest.raises(ClientTooSlow):
        for _ in range(100):
            await delivery.send(pacer, stats, 0.2)
            sent += 1
    assert sent == 6  # 0.2 s at a time: waits once 1.2 s (more than the lead) is out
    assert pacer.lead_s(stats) == pytest.approx(1.2)


async def test_a_client_that_takes_its_audio_is_never_held():
    """Acknowledged bytes are taken audio: a client that takes everything never makes a stream wait,
    however much audio goes out."""
    delivery, stats = FakeDelivery(), StreamStats(RATE)
    pacer = Pacer(delivery, max_lead_s=0.5, max_lag_s=0.01)
    for _ in range(100):
        await delivery.send(pacer, stats, 0.4)
        delivery.pending = 0
    assert stats.samples == 100 * 0.4 * RATE and pacer.lead_s(stats) == 0.0


async def test_a_waiting_stream_goes_on_as_soon_as_the_client_takes_enough():
    """A waiting stream resumes once the client has taken all but max_lead_s (a real-time reader)."""
    delivery, stats = FakeDelivery(), StreamStats(RATE)
    pacer = Pacer(delivery, max_lead_s=0.5, max_lag_s=5.0)
    for _ in range(3):
        await delivery.send(pacer, stats, 0.25)  # 0.75 s out, none taken
    waiting = asyncio.create_task(pacer.wait(stats))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    delivery.pending = int(0.5 * RATE)  # the first item taken: 0.5 s left
    await asyncio.wait_for(waiting, 1.0)
    assert pacer.lead_s(stats) == pytest.approx(0.5)


async def test_streams_on_one_connection_are_paced_each_by_its_own_audio():
    """Two streams on one socket (ElevenLabs' contexts): each one's lead counts its own marks."""
    delivery, first, second = FakeDelivery(), StreamStats(RATE), StreamStats(RATE)
    pacer = Pacer(delivery, max_lead_s=1.0, max_lag_s=0.05)
    await delivery.send(pacer, first, 2.0)
    await delivery.send(pacer, second, 0.5)
    await pacer.wait(second)
    with pytest.raises(ClientTooSlow):
        await pacer.wait(first)


async def test_without_a_delivery_nothing_is_paced():
    """An app behind another server (no delivery measured): waits return at once."""
    stats = StreamStats(RATE)
    pacer = Pacer(None, max_lead_s=0.1, max_lag_s=0.01)
    for _ in range(10):
        await pacer.wait(stats)
        stats.samples += RATE
        pacer.sent(stats)
    assert pacer.lead_s(stats) == 0.0
