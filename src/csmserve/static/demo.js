// csmserve demo page: text in, streamed speech out, with the latency figures that matter.
//
// Flow: Speak sends {"text", "speaker_id", ...} on /ws/generate; every binary frame is mono s16le PCM at
// the stream's rate (24 kHz), converted to float and handed to a player at once, so playback starts with
// the first chunk. The player is an AudioWorklet jitter buffer (pcm-player.js) where the page is a secure
// context, else AudioBufferSourceNodes scheduled back to back. Stop sends {"type": "cancel"} and silences
// the player at once. An AnalyserNode after the player feeds the waveform and level meter.
//
// For tests and curious people, window.csmDemo holds the live state (counts, figures, the last done).
// ?player=scheduled forces the fallback player; ?jitter_ms=N sets the start-up buffer (default 100);
// ?context_rate=N runs the AudioContext at N Hz (the page then resamples, as on a browser without 24 kHz).

const STREAM_RATE = 24000;
const params = new URLSearchParams(location.search);
const JITTER_MS = clampInt(params.get("jitter_ms"), 0, 2000, 100);
const CONTEXT_RATE = clampInt(params.get("context_rate"), 8000, 192000, STREAM_RATE);
const $ = (id) => document.getElementById(id);

const demo = {
  state: "idle",          // idle | connecting | waiting | streaming | playing | finished | stopping | cancelled | error
  requestId: null,
  chunksReceived: 0,
  bytesReceived: 0,
  samplesReceived: 0,     // at the stream rate
  samplesScheduled: 0,    // at the stream rate: handed to the player
  samplesPlayed: 0,       // at the stream rate: reported played by the player
  underruns: 0,
  ttfaMs: null,           // browser: request sent -> first chunk received
  serverTtfaMs: null,     // done.ttfa_ms
  audioMs: null,
  rtf: null,
  lastDone: null,
  lastError: null,
  chunksDropped: 0,
  health: null,
  player: null,           // "worklet" | "scheduled"
  contextRate: null,
  levelDb: null,          // RMS level of what is playing now, dBFS (null: silence)
  requests: 0,
};
window.csmDemo = demo;

let audio = null;         // {ctx, analyser, player}
let socket = null;
let socketUrl = null;
let sentAt = 0;
let envelope = [];        // peak per 20 ms of received audio, for the overview canvas
let lastLevelDb = -Infinity;

function clampInt(raw, lo, hi, fallback) {
  const n = Number.parseInt(raw ?? "", 10);
  return Number.isFinite(n) ? Math.min(hi, Math.max(lo, n)) : fallback;
}

// ---- URLs and auth --------------------------------------------------------------------------------

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The WebSocket URL, relative to this page so that a reverse proxy's path prefix is kept. */
function wsUrl() {
  const url = new URL("ws/generate", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  const key = apiKey();
  if (key) url.searchParams.set("token", key);
  return url.toString();
}

// ---- health ---------------------------------------------------------------------------------------

async function loadHealth() {
  let body = null;
  let status = "unreachable";
  try {
    const response = await fetch(new URL("health", location.href), { headers: authHeaders(), cache: "no-store" });
    body = await response.json().catch(() => null);
    status = body?.status ?? (response.status === 401 || response.status === 403 ? "unauthorized" : `HTTP ${response.status}`);
  } catch (err) {
    body = null;
  }
  demo.health = body;
  const pill = $("health-status");
  pill.dataset.status = status;
  pill.textContent = status;
  if (body) {
    const parts = [body.model, body.engine && `engine ${body.engine}`, body.device, body.dtype].filter(Boolean);
    $("health-details").textContent = parts.join(" · ");
    $("offline-banner").hidden = body.offline_model !== true;
    if (body.engine === "fake") {
      $("offline-hint").textContent = "The server runs the fake engine: a test tone, not a model.";
    }
  }
  if (status === "loading") setTimeout(loadHealth, 2000);
}

// ---- audio ----------------------------------------------------------------------------------------

/** Linear-interpolation resampler that keeps its phase across blocks (used only if rates differ). */
class Resampler {
  constructor(fromRate, toRate) {
    this.step = fromRate / toRate;
    this.pos = 0;          // position of the next output sample, in input samples, relative to `prev`
    this.prev = 0;         // last input sample of the previous block (index -1)
  }

  process(input) {
    const out = [];
    const at = (i) => (i < 0 ? this.prev : input[i]);
    while (this.pos <= input.length - 1) {
      const i = Math.floor(this.pos);
      const frac = this.pos - i;
      out.push(at(i - 1) + (at(i) - at(i - 1)) * frac);
      this.pos += this.step;
    }
    this.pos -= input.length;
    if (input.length) this.prev = input[input.length - 1];
    return Float32Array.from(out);
  }
}

/** AudioWorklet player: a jitter buffer on the audio thread (needs a secure context). */
class WorkletPlayer {
  static async create(ctx, destination) {
    await ctx.audioWorklet.addModule(new URL("pcm-player.js", import.meta.url));
    const node = new AudioWorkletNode(ctx, "pcm-player", {
      numberOfInputs: 0,
      outputChannelCount: [1],
      processorOptions: { prebufferFrames: Math.round((JITTER_MS / 1000) * ctx.sampleRate) },
    });
    node.connect(destination);
    return new WorkletPlayer(ctx, node);
  }

  constructor(ctx, node) {
    this.kind = "worklet";
    this.ctx = ctx;
    this.node = node;
    this.ratio = STREAM_RATE / ctx.sampleRate;
    this.resampler = null;
    this.buffered = 0;
    this.onstatus = () => {};
    this.ondrained = () => {};
    node.port.onmessage = ({ data }) => {
      const played = Math.round(data.played * this.ratio);
      if (data.type === "drained") {
        this.buffered = 0;
        this.ondrained(played, data.underruns);
      } else {
        this.buffered = data.buffered / this.ctx.sampleRate;
        this.onstatus(played, data.underruns);
      }
    };
  }

  start(rate) {
    this.stop();
    this.resampler = rate === this.ctx.sampleRate ? null : new Resampler(rate, this.ctx.sampleRate);
  }

  push(samples) {
    const block = this.resampler ? this.resampler.process(samples) : samples;
    this.node.port.postMessage({ type: "push", samples: block }, [block.buffer]);
  }

  end() {
    this.node.port.postMessage({ type: "end" });
  }

  stop() {
    this.node.port.postMessage({ type: "flush" });
    this.buffered = 0;
  }
}

/** Fallback player: one AudioBufferSourceNode per chunk, each starting where the previous one ends. */
class ScheduledPlayer {
  constructor(ctx, destination) {
    this.kind = "scheduled";
    this.ctx = ctx;
    this.destination = destination;
    this.onstatus = () => {};
    this.ondrained = () => {};
    this.reset();
  }

  reset() {
    this.generation = (this.generation ?? 0) + 1;
    this.sources = new Set();
    this.nextTime = 0;
    this.played = 0;
    this.underruns = 0;
    this.ended = false;
    this.rate = STREAM_RATE;
  }

  get buffered() {
    return Math.max(0, this.nextTime - this.ctx.currentTime);
  }

  start(rate) {
    this.stop();
    this.rate = rate;
  }

  push(samples) {
    const lead = JITTER_MS / 1000;
    const now = this.ctx.currentTime;
    if (this.nextTime === 0) {
      this.nextTime = now + lead;
    } else if (this.nextTime < now + 0.005) {
      this.underruns += 1;          // this chunk came after the previous one finished: a gap
      this.nextTime = now + lead;
    }
    const buffer = this.ctx.createBuffer(1, samples.length, this.rate);
    buffer.copyToChannel(samples, 0);
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.destination);
    const generation = this.generation;
    source.onended = () => {
      if (generation !== this.generation) return;
      this.sources.delete(source);
      this.played += samples.length;
      this.onstatus(this.played, this.underruns);
      this.checkDrained();
    };
    source.start(this.nextTime);
    this.nextTime += buffer.duration;
    this.sources.add(source);
  }

  end() {
    this.ended = true;
    this.checkDrained();
  }

  checkDrained() {
    if (this.ended && this.sources.size === 0) {
      this.ended = false;
      this.ondrained(this.played, this.underruns);
    }
  }

  stop() {
    for (const source of this.sources) {
      source.onended = null;
      try {
        source.stop();
      } catch (err) {
        // never started: nothing to stop
      }
      source.disconnect();
    }
    this.reset();
  }
}

async function ensureAudio() {
  if (audio) {
    if (audio.ctx.state === "suspended") await audio.ctx.resume();
    return audio;
  }
  let ctx;
  try {
    ctx = new AudioContext({ sampleRate: CONTEXT_RATE, latencyHint: "interactive" });
  } catch (err) {
    ctx = new AudioContext({ latencyHint: "interactive" }); // this browser cannot run at 24 kHz: resample
  }
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 2048;
  analyser.connect(ctx.destination);
  let player = null;
  if (params.get("player") !== "scheduled" && ctx.audioWorklet) {
    try {
      player = await WorkletPlayer.create(ctx, analyser);
    } catch (err) {
      console.warn("AudioWorklet unavailable, using scheduled buffers:", err);
    }
  }
  player ??= new ScheduledPlayer(ctx, analyser);
  player.onstatus = (played, underruns) => {
    demo.samplesPlayed = played;
    demo.underruns = underruns;
  };
  player.ondrained = (played, underruns) => {
    demo.samplesPlayed = played;
    demo.underruns = underruns;
    if (demo.state === "playing") setState("finished");
  };
  demo.player = player.kind;
  demo.contextRate = ctx.sampleRate;
  $("player-kind").textContent = `${player.kind} player · AudioContext ${ctx.sampleRate} Hz`;
  if (ctx.state === "suspended") await ctx.resume();
  audio = { ctx, analyser, player };
  return audio;
}

/** s16le bytes -> float32 in [-1, 1). Chunks always hold whole samples. */
function pcm16ToFloat(bytes) {
  const view = new DataView(bytes);
  const out = new Float32Array(bytes.byteLength >> 1);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}

// ---- the request ----------------------------------------------------------------------------------

function setState(state) {
  demo.state = state;
  const el = $("state");
  el.textContent = state;
  el.dataset.state = state;
  const busy = ["connecting", "waiting", "streaming", "stopping"].includes(state);
  $("speak").disabled = busy;
  $("stop").disabled = !(busy || state === "playing") || state === "stopping";
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function openSocket() {
  const url = wsUrl();
  if (socket && socketUrl === url && socket.readyState === WebSocket.OPEN) return Promise.resolve(socket);
  if (socket) socket.close();
  socketUrl = url;
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  socket = ws;
  ws.onmessage = (event) => {
    if (ws !== socket) return;
    if (typeof event.data === "string") onEvent(JSON.parse(event.data));
    else onAudio(event.data);
  };
  ws.onclose = (event) => {
    if (ws !== socket) return;
    socket = null;
    if (["waiting", "streaming", "stopping"].includes(demo.state)) {
      fail(`connection closed (code ${event.code}${event.reason ? `: ${event.reason}` : ""})`);
    }
  };
  return new Promise((resolve, reject) => {
    ws.onopen = () => resolve(ws);
    ws.onerror = () => reject(new Error(`cannot connect to ${url.replace(/token=[^&]*/, "token=…")}`));
  });
}

function optionalNumber(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function resetFigures() {
  Object.assign(demo, {
    chunksReceived: 0, bytesReceived: 0, samplesReceived: 0, samplesScheduled: 0, samplesPlayed: 0,
    underruns: 0, chunksDropped: 0, ttfaMs: null, serverTtfaMs: null, audioMs: null, rtf: null, lastDone: null, lastError: null,
  });
  envelope = [];
  for (const id of ["ttfa-client", "ttfa-server", "audio-duration", "rtf"]) $(id).textContent = "–";
  $("chunks").textContent = "0";
  showError("");
}

async function speak() {
  const text = $("text").value.trim();
  if (!text) {
    showError("Type something to say first.");
    return;
  }
  resetFigures();
  setState("connecting");
  try {
    const { player } = await ensureAudio();
    const ws = await openSocket();
    demo.requests += 1;
    demo.requestId = `demo-${Date.now().toString(36)}-${demo.requests}`;
    player.start(STREAM_RATE);
    const request = {
      text,
      speaker_id: Number($("speaker").value),
      request_id: demo.requestId,
      chunk_ms: optionalNumber("chunk-ms"),
      first_chunk_ms: optionalNumber("first-chunk-ms"),
      temperature: optionalNumber("temperature"),
      seed: optionalNumber("seed"),
    };
    setState("waiting");
    sentAt = performance.now();
    ws.send(JSON.stringify(request)); // undefined fields are left out
  } catch (err) {
    fail(err.message || String(err));
  }
}

function stop() {
  if (!["waiting", "streaming", "playing"].includes(demo.state)) return;
  audio?.player.stop();
  if (demo.state === "playing") {
    setState("cancelled");           // all audio had arrived: only playback to stop
    return;
  }
  setState("stopping");
  socket?.send(JSON.stringify({ type: "cancel", request_id: demo.requestId }));
}

function onAudio(bytes) {
  if (!["waiting", "streaming"].includes(demo.state)) {
    demo.chunksDropped += 1;       // late chunks after Stop: never played
    return;
  }
  if (demo.chunksReceived === 0) {
    demo.ttfaMs = performance.now() - sentAt;
    $("ttfa-client").textContent = `${Math.round(demo.ttfaMs)} ms`;
    setState("streaming");
  }
  const samples = pcm16ToFloat(bytes);
  demo.chunksReceived += 1;
  demo.bytesReceived += bytes.byteLength;
  demo.samplesReceived += samples.length;
  addToEnvelope(samples);
  const count = samples.length;
  audio.player.push(samples);
  demo.samplesScheduled += count;
  $("chunks").textContent = String(demo.chunksReceived);
  $("audio-duration").textContent = `${(demo.samplesReceived / STREAM_RATE).toFixed(2)} s`;
}

function onEvent(event) {
  if (!event.done) return;
  if (event.request_id !== undefined && event.request_id !== demo.requestId) return;
  demo.lastDone = event;
  if (event.error) {
    demo.lastError = event.error;
    audio?.player.stop();
    fail(`${event.error.code}: ${event.error.message}`);
    return;
  }
  if (event.cancelled) {
    audio?.player.stop();
    setState("cancelled");
    return;
  }
  demo.serverTtfaMs = event.ttfa_ms ?? null;
  demo.audioMs = event.audio_ms ?? null;
  demo.rtf = event.rtf ?? null;
  $("ttfa-server").textContent = demo.serverTtfaMs == null ? "n/a" : `${Math.round(demo.serverTtfaMs)} ms`;
  $("audio-duration").textContent = demo.audioMs == null ? "n/a" : `${(demo.audioMs / 1000).toFixed(2)} s`;
  $("rtf").textContent = demo.rtf == null ? "n/a" : formatRtf(demo.rtf);
  if (demo.state === "stopping") {
    setState("cancelled");           // it finished before the cancel arrived; playback is already stopped
    return;
  }
  setState("playing");
  audio.player.end();
}

/** Real-time factor: generation time / audio duration (below 1: faster than real time). */
function formatRtf(rtf) {
  return rtf >= 0.1 ? rtf.toFixed(2) : rtf.toPrecision(2);
}

function fail(message) {
  setState("error");
  showError(message);
}

// ---- drawing --------------------------------------------------------------------------------------

function addToEnvelope(samples) {
  const bucket = STREAM_RATE / 50;
  for (let start = 0; start < samples.length; start += bucket) {
    let peak = 0;
    const end = Math.min(samples.length, start + bucket);
    for (let i = start; i < end; i++) peak = Math.max(peak, Math.abs(samples[i]));
    envelope.push(peak);
  }
}

const scopeData = new Float32Array(2048);

function draw() {
  drawScope($("scope"));
  drawEnvelope($("envelope"));
  requestAnimationFrame(draw);
}

function drawScope(canvas) {
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.fillStyle = "#0f1424";
  g.fillRect(0, 0, width, height);
  const meterWidth = 28;
  const waveWidth = width - meterWidth - 12;
  let rms = 0;
  if (audio) {
    audio.analyser.getFloatTimeDomainData(scopeData);
    g.strokeStyle = "#7c9cff";
    g.lineWidth = 2;
    g.beginPath();
    for (let i = 0; i < scopeData.length; i++) {
      const x = (i / (scopeData.length - 1)) * waveWidth;
      const y = height / 2 - scopeData[i] * (height / 2 - 4);
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
      rms += scopeData[i] * scopeData[i];
    }
    g.stroke();
    rms = Math.sqrt(rms / scopeData.length);
  } else {
    g.strokeStyle = "#2c3553";
    g.beginPath();
    g.moveTo(0, height / 2);
    g.lineTo(waveWidth, height / 2);
    g.stroke();
  }
  // Level meter: RMS in dBFS from -60 to 0, with a slow fall so it is readable.
  const db = rms > 0 ? 20 * Math.log10(rms) : -Infinity;
  demo.levelDb = db > -90 ? db : null;
  lastLevelDb = Math.max(db, (Number.isFinite(lastLevelDb) ? lastLevelDb : -60) - 1.5);
  const fraction = Math.min(1, Math.max(0, (lastLevelDb + 60) / 60));
  const x = width - meterWidth;
  g.fillStyle = "#1d2440";
  g.fillRect(x, 4, meterWidth, height - 8);
  g.fillStyle = fraction > 0.9 ? "#ff6b6b" : fraction > 0.7 ? "#ffd43b" : "#51cf66";
  const h = (height - 8) * fraction;
  g.fillRect(x, height - 4 - h, meterWidth, h);
  $("level").textContent = lastLevelDb > -60 ? `${lastLevelDb.toFixed(0)} dBFS` : "–";
}

function drawEnvelope(canvas) {
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.fillStyle = "#0f1424";
  g.fillRect(0, 0, width, height);
  const seconds = Math.max(5, envelope.length / 50);
  const perPixel = (seconds * 50) / width;
  g.fillStyle = "#4c6ef5";
  for (let px = 0; px < width; px++) {
    const from = Math.floor(px * perPixel);
    const to = Math.max(from + 1, Math.floor((px + 1) * perPixel));
    if (from >= envelope.length) break;
    let peak = 0;
    for (let i = from; i < Math.min(to, envelope.length); i++) peak = Math.max(peak, envelope[i]);
    const h = Math.max(1, peak * (height - 4));
    g.fillRect(px, (height - h) / 2, 1, h);
  }
  const playedX = (demo.samplesPlayed / STREAM_RATE / seconds) * width;
  g.fillStyle = "#ffd43b";
  g.fillRect(Math.min(width - 2, playedX), 0, 2, height);
  const buffered = audio ? audio.player.buffered : 0;
  $("buffered").textContent = audio ? `${Math.round(buffered * 1000)} ms` : "–";
}

// ---- wiring ---------------------------------------------------------------------------------------

$("speak").addEventListener("click", speak);
$("stop").addEventListener("click", stop);
$("text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("speak").disabled) speak();
});
$("api-key").addEventListener("change", loadHealth);
setState("idle");
loadHealth();
requestAnimationFrame(draw);
