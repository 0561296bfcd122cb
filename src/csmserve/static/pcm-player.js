// AudioWorklet processor "pcm-player": a small jitter buffer between the WebSocket and the sound card.
//
// The page posts Float32Array blocks of mono samples, already at the AudioContext's rate, in the order
// they must sound. Playback starts once `prebufferFrames` are queued (or the stream has ended), then runs
// from the queue without gaps: consecutive blocks are contiguous in the output by construction. If the
// queue runs dry before the stream ends, the processor outputs silence and waits for `prebufferFrames`
// again; audio that arrives after such a silence counts as an underrun (an audible gap).
//
// Messages in:  {type: "push", samples: Float32Array}  {type: "end"}  {type: "flush"} (drop everything)
// Messages out: {type: "status", played, buffered, underruns}  about every 50 ms while there is audio
//               {type: "drained", played, underruns}           once, when an ended stream has played out

class PcmPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.prebufferFrames = Math.max(0, opts.prebufferFrames | 0);
    this.statusEvery = Math.max(1, Math.round((0.05 * sampleRate) / 128));
    this.reset();
    this.port.onmessage = (event) => this.receive(event.data);
  }

  reset() {
    this.queue = [];        // Float32Array blocks not yet fully played
    this.offset = 0;        // frames of queue[0] already played
    this.buffered = 0;      // frames queued and not yet played
    this.playing = false;   // false while (re)filling the jitter buffer
    this.starved = false;   // the queue ran dry mid-stream: the next block comes after a gap
    this.ended = false;     // no more blocks will come for this stream
    this.drained = false;
    this.played = 0;
    this.underruns = 0;
    this.quanta = 0;
  }

  receive(message) {
    if (message.type === "push") {
      this.queue.push(message.samples);
      this.buffered += message.samples.length;
      this.drained = false;
      if (this.starved) {
        this.starved = false;
        this.underruns += 1;
      }
    } else if (message.type === "end") {
      this.ended = true;
      this.starved = false;
    } else if (message.type === "flush") {
      this.reset();
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    let written = 0;
    if (!this.playing && this.buffered > 0 && (this.buffered >= this.prebufferFrames || this.ended)) {
      this.playing = true;
    }
    if (this.playing) {
      while (written < out.length && this.queue.length > 0) {
        const block = this.queue[0];
        const n = Math.min(out.length - written, block.length - this.offset);
        out.set(block.subarray(this.offset, this.offset + n), written);
        written += n;
        this.offset += n;
        if (this.offset === block.length) {
          this.queue.shift();
          this.offset = 0;
        }
      }
      this.buffered -= written;
      this.played += written;
      if (this.buffered === 0) {
        this.playing = false;
        this.starved = !this.ended;
      }
    }
    out.fill(0, written);
    for (let ch = 1; ch < outputs[0].length; ch++) outputs[0][ch].set(out);

    if (this.ended && this.buffered === 0 && !this.drained) {
      this.drained = true;
      this.port.postMessage({ type: "drained", played: this.played, underruns: this.underruns });
    } else if (written > 0 && ++this.quanta % this.statusEvery === 0) {
      this.port.postMessage({ type: "status", played: this.played, buffered: this.buffered, underruns: this.underruns });
    }
    return true;
  }
}

registerProcessor("pcm-player", PcmPlayer);
