"""Server settings: one frozen object, read from ``CSM_*`` environment variables and CLI flags.

Never imports torch: ``csmserve --help`` and the protocol layer must stay light.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "sesame/csm-1b"
#: ``--model offline``: the offline model (random weights, noise), asked for by name.
OFFLINE_MODEL = "offline"


class Settings(BaseSettings):
    """Everything an operator can set. Each field is also ``CSM_<NAME>`` and ``--<name>``."""

    model_config = SettingsConfigDict(env_prefix="CSM_", frozen=True, extra="ignore")

    # Model
    model: str | None = Field(
        None,
        description=(
            "Hugging Face model id, local checkpoint directory, or 'offline' (the offline model: random "
            "weights, noise). Unset: sesame/csm-1b when a Hugging Face token or a cached copy is available, "
            "else the offline model. A model that was named, or chosen because of a token or a cache, loads "
            "or start-up stops (exit 3): it never falls back to the offline model."
        ),
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description=(
            "auto: bfloat16 on CUDA that supports it, else float16 on CUDA; on a CPU, bfloat16 where it is "
            "native (AVX-512 BF16 or AMX), else float32. The start-up log says which and why."
        ),
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "torch.compile (inductor) the frame step: fused kernels, compiled for every batch size at start-up "
            "(minutes the first time; see compile_cache_dir). auto: off (on a GPU the step is still one "
            "captured CUDA graph of the eager kernels; see cuda_graphs)."
        ),
    )
    cuda_graphs: bool = Field(
        True,
        description=(
            "On a GPU, capture the frame step of every batch-size bucket in a CUDA graph at start-up: one "
            "graph replay per step instead of thousands of kernel launches."
        ),
    )
    compile_cache_dir: Path | None = Field(
        None,
        description=(
            "Where torch.compile keeps its caches (TORCHINDUCTOR_CACHE_DIR): put it on a persistent volume "
            "so a restart does not compile again. Unset: torch's default (a temporary directory)."
        ),
    )
    engine: Literal["csm", "fake"] = Field(
        "csm", description="csm: the model. fake: a deterministic tone generator for tests and load tests."
    )
    offline_model_dir: Path = Field(
        Path("var/offline-model"), description="Where the offline model is written when it is needed."
    )
    prefix_cache: bool = Field(
        True,
        description=(
            "Reuse the backbone's cached keys/values for the part of a prompt the previous generation already "
            "read (a voice's context, a text stream's earlier sentences) instead of prefilling it again."
        ),
    )
    max_batch: int | None = Field(
        None,
        ge=1,
        description=(
            "Streams generated together in one batched step (each holds a KV-cache slot). Unset: on a GPU as "
            "many as fit in 80 percent of its free memory, at most 256; 8 on a CPU. More streams than this wait in "
            "the queue."
        ),
    )
    prefill_chunk: int | None = Field(
        None,
        ge=1,
        description=(
            "Prompt positions prefilled per step, for all the prompts joining in it together (one batched "
            "forward): a long prompt joins in chunks between the others' frames, so an active stream's gap "
            "stays about one step plus one chunk. Unset: 4096 on a GPU, 256 on a CPU."
        ),
    )
    warmup: bool = Field(True, description="Run one short generation at start-up before reporting ready.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice).")

    fake_frame_delay_ms: float = Field(0.0, ge=0, description="fake engine only: time per 80 ms frame.")

    # Processes
    engine_process: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Run the engine in its own process (one per GPU), fed by the API over local sockets: the model "
            "thread never waits for the API's interpreter lock, several API workers can feed one GPU, and a "
            "failed GPU restarts the engine, not the service. auto: on with the CSM engine on a GPU, or when "
            "api_workers is above 1; off otherwise (tests, a CPU)."
        ),
    )
    api_workers: int | None = Field(
        None,
        ge=1,
        description=(
            "HTTP/WebSocket worker processes, all feeding the engine process(es). Unset: 1, or on a GPU host "
            "one per four CPU cores (at most 8)."
        ),
    )
    gpus: int | None = Field(
        None, ge=1, description="GPUs to serve on, one engine process each (unset: every visible GPU)."
    )
    engine_heartbeat_timeout_s: float = Field(
        3.0,
        gt=0,
        description=(
            "An engine process silent for this long is taken for dead: its streams end with an error and "
            "/ready says why until it is back."
        ),
    )
    engine_address: str | None = Field(
        None,
        description="Connect to an engine process already running at this ipc:// address (set by csmserve "
        "for its own API workers; not for operators).",
    )

    # Server
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    log_format: Literal["text", "json"] = Field("text", description="text, or one JSON object per line.")
    log_query_strings: bool = Field(
        False, description="Keep query strings in access log lines (credentials still redacted). Off: the path only."
    )
    wyoming_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "Also serve Wyoming (Home Assistant's text-to-speech protocol) on this port, from the same engine. "
            "Unset: off (`csmserve wyoming` alone listens on 10200). Wyoming has no authentication."
        ),
    )
    wyoming_host: str = Field(
        "127.0.0.1",
        description="Address the Wyoming port listens on: loopback by default, as it has no authentication.",
    )

    # Security
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (),
        description=(
            "Comma-separated API keys (environment only: a flag would show them in the process list). "
            "Empty: no authentication (a warning at start-up)."
        ),
    )
    api_keys_file: Path | None = Field(
        None, description="A file with one API key per line (# comments allowed), added to CSM_API_KEYS."
    )
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Comma-separated Origins allowed to open WebSockets. Empty: any."
    )
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description=(
            "Comma-separated Host names the server answers for (.example.com: it and its subdomains; *: any), "
            "besides IP addresses and localhost. Empty: with keys off and a loopback host, only addresses and "
            "localhost (DNS rebinding); otherwise any."
        ),
    )
    protect_metrics: bool = Field(True, description="/metrics needs an API key when keys are configured.")

    # Admission and limits
    max_streams: int | None = Field(
        None,
        ge=1,
        description="Requests streaming at once (all connections); more get 1013/429. Unset: the engine's batch "
        "(max_batch), at least 16.",
    )
    max_streams_per_key: int | None = Field(
        None,
        ge=1,
        description="Requests one API key (without keys: one client address) may stream at once, on every route "
        "together (an ElevenLabs context counts while it speaks); more get 1013/429. Unset: half of max_streams "
        "(at least 1), or all of it when exactly one key is configured.",
    )
    max_queue: int | None = Field(
        None,
        ge=1,
        description="Requests waiting for a row of the engine; more get 1013/429. Unset: the engine's batch, at "
        "least 32.",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Deadline for one request, from its start.")
    max_lag_s: float = Field(10.0, gt=0, description="A client that stops reading for this long is closed.")
    max_lead_s: float = Field(
        5.0, gt=0, description=(
            "Streamed audio runs at most this many seconds ahead of what the client has taken off the socket "
            "(acknowledged by its TCP); beyond it the stream waits and sits out the engine's steps."
        ),
    )
    idle_timeout_s: float = Field(300.0, gt=0, description="A WebSocket with nothing to do for this long is closed.")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight streams may finish.")
    stall_timeout_s: float = Field(
        30.0, gt=0, description="Work waiting or generating and no engine step for this long: /ready fails, /health says why."
    )
    auth_timeout_s: float = Field(
        10.0, gt=0, description="A WebSocket without a key in its URL or headers must send it within this long."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description=(
            "An HTTP request's headers must arrive within this long; on the Wyoming port, the first event from "
            "connecting, and each event from its first byte."
        ),
    )
    body_timeout_s: float = Field(
        120.0, gt=0, description="A request body must arrive in full within this long after its headers (408 otherwise)."
    )
    min_body_rate: int = Field(
        1024, ge=0, description=(
            "A request body must keep arriving at this many bytes per second at least, counted after its "
            "first second (408 otherwise; 0: no minimum)."
        ),
    )
    max_connections: int = Field(1024, ge=1, description="Open connections (all kinds); more get 503.")
    probe_connections: int = Field(
        8, ge=0, description="Connections beyond max_connections that only /health and /ready may use."
    )
    max_unauthenticated: int = Field(
        64, ge=1, description="WebSockets at once that have not yet sent their key; more are closed with 1013."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest accepted REST request body (voice uploads: max_upload_bytes)."
    )

    # Requests
    max_text_chars: int = Field(4096, ge=1, description="Longest accepted text, in characters (OpenAI's limit).")
    min_speaker_id: int = Field(0, description="Lowest accepted speaker_id.")
    max_speaker_id: int = Field(9, description="Highest accepted speaker_id.")
    default_chunk_ms: int = Field(200, ge=20, le=1000, description="Audio chunk length when a request names none.")
    max_audio_ms: int = Field(
        90_000, ge=80, description="Cap on one request's audio; the default per request is derived from its text."
    )
    ms_per_char: int = Field(
        120, ge=10, description="Default audio budget per text character (generous: speech is ~70 ms/char)."
    )
    min_audio_ms: int = Field(4_000, ge=80, description="Default audio budget floor for very short texts.")
    max_chars_per_generation: int = Field(
        300, ge=20, description="Long text is generated in sentence groups of at most this many characters."
    )
    max_pending_per_connection: int = Field(
        8, ge=1, description="Requests queued on one WebSocket before new ones are refused."
    )
    max_message_bytes: int = Field(65_536, ge=1024, description="Largest accepted WebSocket message, in bytes.")
    max_stream_chars: int = Field(
        100_000, ge=1, description="Most text one streamed-text context_id may carry, in characters."
    )
    max_contexts_per_connection: int = Field(
        16, ge=1, description="Streamed-text context_ids one WebSocket may open (ended ones count too; "
        "on ElevenLabs sockets: open at once, never more than 5)."
    )

    # Voices
    voices_dir: Path = Field(Path("var/voices"), description="Where registered voices are kept (survive restarts).")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest accepted voice upload.")
    max_voice_seconds: float = Field(30.0, gt=0, description="Longest accepted reference clip for a voice.")
    max_voice_channels: int = Field(2, ge=1, le=8, description="Most channels a voice upload may have.")
    max_voice_sample_rate: int = Field(48_000, ge=8000, le=192_000, description="Highest sample rate of a voice upload.")
    default_voice: str | None = Field(
        None,
        description=(
            "A registered voice (name or id) for requests that name none, and the voice named default. "
            "Unset: such requests speak as a bare speaker id, whose voice changes from request to request. "
            "Not registered at start-up: a warning, and those requests fail until it is."
        ),
    )
    voice_map: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description=(
            "Comma-separated NAME=VOICE pairs: a voice name a client sends (OpenAI's alloy, an ElevenLabs "
            "voice_id) that means a registered voice, on every API. Names are matched in any case."
        ),
    )
    voice_map_file: Path | None = Field(
        None, description="A file of NAME=VOICE lines (# comments allowed), added to CSM_VOICE_MAP."
    )

    # REST audio store
    audio_dir: Path = Field(Path("var/audio"), description="Where /generate keeps WAV files for download.")
    audio_max_files: int = Field(256, ge=1, description="Most WAV files kept; the oldest go first.")
    audio_max_bytes: int = Field(512 * 1024 * 1024, ge=1, description="Most bytes of WAV kept.")
    audio_ttl_s: int = Field(3600, ge=1, description="Seconds a WAV stays downloadable.")

    @field_validator("api_keys", "allowed_origins", "allowed_hosts", "voice_map", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _check_ranges(self) -> Settings:
        if self.min_speaker_id > self.max_speaker_id:
            raise ValueError("min_speaker_id must not exceed max_speaker_id")
        return self

    def uses_engine_process(self) -> bool:
        """Whether the engine runs in a process of its own (``engine_process``, resolved)."""
        if self.engine_process != "auto":
            return self.engine_process == "on"
        if (self.api_workers or 1) > 1:
            return True
        return self.engine == "csm" and self.device != "cpu" and _cuda_available()

    def resolved_api_workers(self) -> int:
        """``api_workers``, or its default: 1, or one per four cores on a GPU host (at most 8)."""
        if self.api_workers is not None:
            return self.api_workers
        if self.engine == "csm" and self.device != "cpu" and _cuda_available():
            return max(1, min(8, (os.cpu_count() or 1) // 4))
        return 1

    def resolved_max_batch(self, device: str) -> int:
        """``max_batch``, or its default for ``device`` ("cuda..." or "cpu"; on a GPU the engine lowers
        it to what fits in memory)."""
        if self.max_batch is not None:
            return self.max_batch
        return 256 if device.startswith("cuda") else 8

    def resolved_prefill_chunk(self, device: str) -> int:
        """``prefill_chunk``, or its default for ``device``."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        return 4096 if device.startswith("cuda") else 256

    def resolved_max_streams(self, max_batch: int) -> int:
        """``max_streams``, or its default for an engine of ``max_batch`` rows."""
        return self.max_streams if self.max_streams is not None else max(16, max_batch)

    def resolved_max_streams_per_key(self, max_streams: int) -> int:
        """``max_streams_per_key``, or its default for a server streaming ``max_streams`` at once."""
        if self.max_streams_per_key is not None:
            return self.max_streams_per_key
        return max_streams if len(self.api_keys) == 1 else max(1, max_streams // 2)

    def resolved_max_queue(self, max_batch: int) -> int:
        """``max_queue``, or its default for an engine of ``max_batch`` rows."""
        return self.max_queue if self.max_queue is not None else max(32, max_batch)

    @model_validator(mode="after")
    def _read_key_file(self) -> Settings:
        if self.api_keys_file is None:
            return self
        keys = _lines(self.api_keys_file, "api_keys_file")
        if not keys:
            raise ValueError(f"api_keys_file {self.api_keys_file} holds no key")
        object.__setattr__(self, "api_keys", self.api_keys + tuple(SecretStr(k) for k in keys))
        return self

    @model_validator(mode="after")
    def _read_voice_map(self) -> Settings:
        pairs = self.voice_map
        if self.voice_map_file is not None:
            pairs += tuple(_lines(self.voice_map_file, "voice_map_file"))
        object.__setattr__(self, "voice_map", pairs)
        self.voice_aliases()  # every pair well formed, no name twice
        if self.default_voice is not None and not self.default_voice.strip():
            raise ValueError("default_voice must name a registered voice (or be unset)")
        return self

    def voice_aliases(self) -> dict[str, str]:
        """``voice_map`` as ``{name: voice}``. Raises ``ValueError`` for a pair that is not ``NAME=VOICE``,
        a name given twice (in any case), or a name or voice that is a speaker id (digits)."""
        aliases: dict[str, str] = {}
        for pair in self.voice_map:
            name, sep, voice = (part.strip() for part in pair.partition("="))
            if not sep or not name or not voice:
                raise ValueError(f"voice_map: {pair!r} is not NAME=VOICE (e.g. alloy=anna)")
            if name.isdigit() or voice.isdigit():
                raise ValueError(f"voice_map: {pair!r}: speaker ids stay speaker ids; map names to registered voices")
            if any(known.casefold() == name.casefold() for known in aliases):
                raise ValueError(f"voice_map: {name!r} is mapped twice")
            aliases[name] = voice
        return aliases

    def audio_budget_ms(self, text: str) -> int:
        """Default maximum audio for ``text``: proportional to its length, within the server cap."""
        return min(self.max_audio_ms, max(self.min_audio_ms, len(text) * self.ms_per_char))


def _cuda_available() -> bool:
    """Whether a CUDA device is visible, without importing torch (config never imports it): the NVIDIA
    driver's device nodes, narrowed by ``CUDA_VISIBLE_DEVICES`` when it hides every GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def _lines(path: Path, setting: str) -> list[str]:
    """The lines of the file a setting names, stripped, without blank lines and ``#`` comments."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {setting} {path}: {exc.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
