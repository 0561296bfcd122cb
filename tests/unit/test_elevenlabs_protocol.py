"""The socket-free part of the ElevenLabs API: formats, query, messages, text buffering, alignment, contexts."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from csmserve.api.elevenlabs.formats import OUTPUT_FORMATS, output_sink, parse_output_format
from csmserve.api.elevenlabs.messages import CloseContext, CloseSocket, TextInput, key_of, parse_message, parse_query
from csmserve.api.elevenlabs.session import ContextSession
from csmserve.api.elevenlabs.text import ContextText, http_alignment, joined, spread_timings, ws_alignment
from csmserve.errors import InvalidRequest
from csmserve.speech import StreamStats
from csmserve.text.sentences import split_sentences

TONE = (0.3 * np.sin(2 * np.pi * 220 * np.arange(24_000) / 24_000)).astype(np.float32)


@pytest.mark.parametrize(
    "name, codec, rate, bit_rate",
    [("pcm_16000", "pcm", 16000, None), ("ulaw_8000", "mulaw", 8000, None), ("alaw_8000", "alaw", 8000, None),
     ("mp3_44100_128", "mp3", 44100, 128_000), ("mp3_22050_32", "mp3", 22050, 32_000)],
)  # fmt: skip
def test_output_format_names_parse(name, codec, rate, bit_rate):
    """codec_rate[_kbps] names become a codec, a rate and a bit rate."""
    fmt = parse_output_format(name)
    assert (fmt.codec, fmt.sample_rate, fmt.bit_rate) == (codec, rate, bit_rate)


def test_unknown_output_format_lists_the_valid_ones():
    """A name outside the list is an InvalidRequest naming the accepted ones."""
    with pytest.raises(InvalidRequest, match="pcm_44100"):
        parse_output_format("opus_48000_64")


def sink(fmt, chunk_ms: int = 200):
    """The sink one stream in ``fmt`` gets: chunks of ``chunk_ms``."""
    return output_sink(fmt, StreamStats(24_000), chunk_ms)


@pytest.mark.parametrize("name", [n for n in OUTPUT_FORMATS if not n.startswith("mp3")])
def test_raw_formats_give_one_second_of_samples_at_their_rate(name):
    """PCM and G.711: a second of 24 kHz audio becomes a second of samples at the format's rate."""
    fmt = parse_output_format(name)
    audio = sink(fmt, chunk_ms=100)
    chunks = audio.feed(TONE)
    data = b"".join(chunks + audio.finish())
    assert abs(len(data) // fmt.bytes_per_sample - fmt.sample_rate) <= 2
    assert all(len(c) == fmt.bytes_per_sample * fmt.sample_rate // 10 for c in chunks)


def test_mp3_is_encoded_at_the_requested_rate():
    """mp3_44100_128 decodes as 44.1 kHz mono MPEG audio of the input's duration."""
    audio = sink(parse_output_format("mp3_44100_128"))
    data = b"".join(audio.feed(TONE) + audio.finish())
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        assert (container.format.name, stream.rate) == ("mp3", 44100)
    assert abs(samples / 44100 - 1.0) < 0.1


def test_cut_releases_the_partial_chunk_without_changing_the_bytes():
    """Cutting at sentence ends changes chunk sizes, never the stream's bytes."""
    fmt = parse_output_format("pcm_22050")
    whole, cut = sink(fmt), sink(fmt)
    a = b"".join(whole.feed(TONE[:10_000]) + whole.feed(TONE[10_000:]) + whole.finish())
    b = b"".join(cut.feed(TONE[:10_000]) + cut.cut() + cut.feed(TONE[10_000:]) + cut.finish())
    assert a == b


def test_query_parameters_are_validated_and_defaulted():
    """Defaults follow ElevenLabs (mp3_44100_128, 20 s inactivity); bad values are refused by name."""
    query = parse_query({"model_id": "eleven_flash_v2_5", "language_code": "en", "apply_text_normalization": "off"})
    assert query.output.name == "mp3_44100_128" and query.inactivity_timeout_s == 20 and not query.auto_mode
    assert parse_query({"auto_mode": "true", "seed": "42", "sync_alignment": "true"}).seed == 42
    assert not query.normalize  # apply_text_normalization=off; "auto" (the default) and "on" normalise
    assert all(parse_query(q).normalize for q in ({}, {"apply_text_normalization": "auto"}, {"apply_text_normalization": "on"}))
    for bad, name in [({"auto_mode": "maybe"}, "auto_mode"), ({"inactivity_timeout": "500"}, "inactivity_timeout"),
                      ({"seed": "-1"}, "seed"), ({"apply_text_normalization": "x"}, "apply_text_normalization")]:  # fmt: skip
        with pytest.raises(InvalidRequest, match=name):
            parse_query(bad)


def test_client_messages_parse_to_types():
    """Each documented message shape becomes its typed message."""
    opening = parse_message('{"text": " ", "context_id": "c", "generation_config": {"chunk_length_schedule": [50, 90]}}', 100)
    assert opening == TextInput(context_id="c", text=" ", schedule=(50, 90))
    assert parse_message('{"context_id": "c", "flush": true}', 100) == TextInput(context_id="c", text="", flush=True)
    assert parse_message('{"context_id": "c", "close_context": true}', 100) == CloseContext(context_id="c")
    assert parse_message('{"close_socket": true}', 100) == CloseSocket()
    with pytest.raises(InvalidRequest, match="limit is 10"):
        parse_message('{"text": "' + "x" * 11 + '"}', 10)


def test_key_comes_from_either_documented_field():
    """xi_api_key (multi), xi-api-key (single) and authorization: Bearer all carry the key."""
    assert key_of('{"xi_api_key": "a"}') == "a"
    assert key_of('{"xi-api-key": "b"}') == "b"
    assert key_of('{"authorization": "Bearer c"}') == "c"
    assert key_of('{"text": " "}') is None


def test_auto_mode_releases_each_sentence_once_certain_like_ws_generate():
    """auto_mode: word by word, the sentences come out as split_sentences gives them for the whole text."""
    text = "Dr. Smith arrived at 3 p.m. today. He was late! Was he? Yes"
    buffer = ContextText(auto_mode=True)
    out = [s for word in text.split(" ") for s in buffer.push(word + " ")] + buffer.flush()
    assert out == split_sentences(text)


def test_schedule_holds_text_until_each_threshold():
    """Without auto_mode, text waits for 60 characters, then for 70 more (the schedule's next step)."""
    buffer = ContextText(schedule=(60, 70))
    assert buffer.push("One short sentence. ") == []
    assert buffer.push("Another short one here. And a third that ") == ["One short sentence.", "Another short one here.", "And a third that"]
    assert buffer.push("ends. " * 10) == []
    assert buffer.push("ends. " * 2) != []


def test_try_trigger_speaks_complete_sentences_or_a_long_buffer():
    """try_trigger_generation: complete sentences go; an unfinished one only once 50 characters wait."""
    buffer = ContextText()
    buffer.push("Done here. And then")
    assert buffer.try_trigger() == ["Done here."]
    assert buffer.try_trigger() == []
    buffer.push(" some more words that make this long enough to go ")
    assert buffer.try_trigger() == ["And then some more words that make this long enough to go"]


def test_a_word_still_being_written_waits_for_its_end():
    """A schedule's threshold or try_trigger speaks the buffer but the unfinished last word: "$42." then
    "50" stays one price; a flush speaks it."""
    buffer = ContextText(schedule=(50,))
    assert buffer.push("Thanks for waiting, the total for your order is $42.") == ["Thanks for waiting, the total for your order is"]
    assert buffer.push("50") == []
    assert buffer.flush() == ["$42.50"]
    buffer = ContextText()
    buffer.push("A long enough unfinished sentence that ends with the number 12")
    assert buffer.try_trigger() == ["A long enough unfinished sentence that ends with the number"]
    assert buffer.push(",345 people. ") == []
    assert buffer.flush() == ["12,345 people."]


def test_buffer_never_holds_more_than_max_chars():
    """A context that never ends a sentence is spoken once max_chars wait."""
    buffer = ContextText(auto_mode=True, max_chars=30)
    assert buffer.push("no sentence end in this text ") == []
    assert buffer.push("at all") == ["no sentence end in this text at all"]


def test_timings_spread_the_span_over_the_characters():
    """Start times rise, each character ends where the next starts, the last ends at the span's end."""
    chars, starts, ends = spread_timings("Hi, you.", 100.0, 800.0)
    assert chars == list("Hi, you.") and starts[0] == 100.0 and ends[-1] == pytest.approx(900.0)
    assert all(e == s2 for e, s2 in zip(ends, starts[1:]))
    assert ends[0] - starts[0] > ends[2] - starts[2]  # a letter lasts longer than a comma
    ws = ws_alignment(spread_timings("Hi, you.", 1000.0, 800.0), origin_ms=1000.0)
    assert sum(ws["charDurationsMs"]) == 800 and ws["charStartTimesMs"][0] == 0
    http = http_alignment(joined([spread_timings("Hi.", 0.0, 300.0), spread_timings(" Yo.", 300.0, 400.0)]))
    assert http["characters"] == list("Hi. Yo.") and http["character_end_times_seconds"][-1] == 0.7


def test_flush_then_close_finishes_and_a_second_close_cancels():
    """close_context after flush lets the context finish; another close_context (barge-in) cancels it."""
    session = ContextSession(multi=True, auto_mode=False, max_text_chars=100)
    actions = session.handle('{"text": "Hello there", "context_id": "c"}')
    (context,) = actions.opened
    assert session.handle('{"context_id": "c", "flush": true}').speak == [(context, "Hello there")]
    assert session.handle('{"context_id": "c", "close_context": true}').finish == [context]
    assert session.handle('{"context_id": "c", "close_context": true}').cancel == [context]
    session.ended(context)
    assert session.handle('{"context_id": "c", "close_context": true}').cancel == []


def test_close_without_flush_is_a_barge_in():
    """close_context with text still streaming cancels the context at once."""
    session = ContextSession(multi=True, auto_mode=True, max_text_chars=100)
    (context,) = session.handle('{"text": "First one. Second", "context_id": "c"}').opened
    assert session.handle('{"context_id": "c", "close_context": true}').cancel == [context]


def test_contexts_per_connection_are_bounded():
    """A sixth open context is refused with an error; the five stay."""
    session = ContextSession(multi=True, auto_mode=False, max_text_chars=100)
    for i in range(5):
        assert session.handle(f'{{"text": " ", "context_id": "c{i}"}}').opened
    actions = session.handle('{"text": " ", "context_id": "c5"}')
    assert actions.opened == [] and actions.events[0]["error"] == "invalid_input_message"


def test_the_server_limit_on_contexts_applies_when_smaller_than_five():
    """max_contexts 2: a third open context is refused; a closed one makes room once it has ended."""
    session = ContextSession(multi=True, auto_mode=False, max_text_chars=100, max_contexts=2)
    opened = [session.handle(f'{{"text": " ", "context_id": "{cid}"}}').opened for cid in ("a", "b")]
    assert all(opened)
    assert session.handle('{"text": " ", "context_id": "c"}').opened == []
    (stopped,) = session.handle('{"context_id": "a", "close_context": true}').cancel
    assert session.handle('{"text": " ", "context_id": "c"}').opened == []  # still stopping
    session.ended(stopped)
    assert session.handle('{"text": " ", "context_id": "c"}').opened


def test_finishing_contexts_count_until_they_have_ended():
    """Open, flush, close in a loop: the finishing contexts still count, so a sixth is refused until
    one of them has sent its isFinal (they cannot all speak at once)."""
    session = ContextSession(multi=True, auto_mode=False, max_text_chars=100)
    finishing = []
    for i in range(5):
        (context,) = session.handle(f'{{"text": "Say {i}.", "context_id": "c{i}", "flush": true}}').opened
        assert session.handle(f'{{"context_id": "c{i}", "close_context": true}}').finish == [context]
        finishing.append(context)
    refused = session.handle('{"text": "One more.", "context_id": "c5", "flush": true}')
    assert refused.opened == [] and refused.speak == [] and "still speaking" in refused.events[0]["message"]
    session.ended(finishing[0])
    assert session.handle('{"text": "One more.", "context_id": "c5", "flush": true}').opened


def test_a_context_id_reused_while_its_namesake_finishes_counts_twice():
    """Closing a context and opening one with the same id: both count while the first finishes, and a
    barge-in on that id stops the open one first, then the finishing one."""
    session = ContextSession(multi=True, auto_mode=False, max_text_chars=100, max_contexts=2)
    (first,) = session.handle('{"text": "Hi.", "context_id": "c", "flush": true}').opened
    session.handle('{"context_id": "c", "close_context": true}')
    (second,) = session.handle('{"text": "Again.", "context_id": "c", "flush": true}').opened
    assert session.handle('{"text": " ", "context_id": "d"}').opened == []
    assert session.handle('{"context_id": "c", "close_context": true}').finish == [second]
    assert session.handle('{"context_id": "c", "close_context": true}').cancel == [first, second]
    assert session.handle('{"context_id": "c", "close_context": true}').cancel == []


def test_a_context_carries_at_most_max_stream_chars():
    """Text that would take a context past max_stream_chars is refused whole, naming the context; other
    contexts have their own share."""
    session = ContextSession(multi=True, auto_mode=True, max_text_chars=100, max_stream_chars=20)
    (context,) = session.handle('{"text": "Hello there. ", "context_id": "a"}').opened
    refused = session.handle('{"text": "Too much text. ", "context_id": "a"}')
    assert refused.speak == [] and refused.events[0]["error"] == "max_character_limit_exceeded"
    assert refused.events[0]["contextId"] == "a"
    assert session.handle('{"context_id": "a", "flush": true}').speak == [(context, "Hello there.")]
    assert session.handle('{"text": "Other one here. ", "context_id": "b", "flush": true}').speak


def test_stream_input_empty_text_ends_the_input():
    """stream-input: "" speaks what is buffered, finishes the context and closes the socket."""
    session = ContextSession(multi=False, auto_mode=False, max_text_chars=100)
    (context,) = session.handle('{"text": " "}').opened
    session.handle('{"text": "Bye now"}')
    actions = session.handle('{"text": ""}')
    assert actions.speak == [(context, "Bye now")] and actions.finish == [context] and actions.close_socket
    assert session.handle('{"text": "late"}').speak == []
