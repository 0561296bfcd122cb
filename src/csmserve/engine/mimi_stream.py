"""Streaming Mimi decoding: audio codes in, 80 ms of 24 kHz audio per frame out, state kept between calls.

Why this exists: ``transformers``' ``MimiModel.decode`` has no decoder-side streaming state. Decoding each
new frame alone clicks at every boundary (the convolutions lose their left context and the transformer its
past), and re-decoding the whole history per frame costs O(n^2). This module runs the same weights stage by
stage and carries every piece of state across calls:

- quantizer: stateless (an embedding lookup and a 1x1 projection per frame);
- transposed convolutions (the 2x ``upsample`` and the SEANet upsamplers): the overlap tail
  (``kernel - stride`` samples of partial sums, without bias) is added to the next call's head;
- decoder transformer: a per-layer key/value cache of the last ``sliding_window - 1`` positions (keys
  already rotated at their absolute positions, which keep counting across calls);
- causal convolutions: the last ``effective_kernel - 1`` input samples, zeros at the start as in the
  one-shot path's constant left padding. ELU and residual adds are pointwise and need nothing.

Batched: the state lives in ``slots`` rows, one per stream; a call decodes the next frames of any
set of rows at once (every row the same number of frames), and each row sees only its own state, so
streams join and leave the batch without touching each other. :class:`BatchedMimiDecoder` is the
scheduler's; :class:`StreamingMimiDecoder` is one stream on one row.

Invariant: for any split of an utterance's codes into calls, the concatenated outputs equal
``codec.decode(codes).audio_values[0, 0]`` (float32: within 1e-4), sample for sample and in length.
Because every transposed convolution trims all of its padding on the right (``trim_right_ratio == 1``),
the one-shot output for ``n`` frames is exactly ``n * frame_size`` samples and none of them depends on
later frames, so every call's output is final and there is nothing to flush at the end.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiResnetBlock,
    apply_rotary_pos_emb,
    repeat_kv,
)


#: The state rows (slots) a call reads and writes, one per batch row: a ``(B,)`` long tensor of slots, or
#: ``slice(0, B)`` (the first ``B`` slots: the captured step, whose writes a ``go`` mask gates).
Rows = torch.Tensor | slice


def _store(state: torch.Tensor, rows: Rows, value: torch.Tensor, go: torch.Tensor | None) -> None:
    """``state[rows] = value``, or with ``go`` (``(B,)`` bool) only for the rows where it is true: the others
    keep their state, so rows that are not decoding this step sit in the batch without changing."""
    if go is None:
        state[rows] = value
    else:
        gate = go.view(-1, *([1] * (value.dim() - 1)))
        state[rows] = torch.where(gate, value, state[rows])


class _CausalConv:
    """A stride-1 causal ``MimiConv1d`` that keeps each row's last ``effective_kernel - 1`` input samples.

    At stride 1 the one-shot path's extra right padding (``_get_extra_padding_for_conv1d``) is zero, so
    ``T`` samples in give ``T`` samples out, aligned with the input.
    """

    def __init__(self, layer: MimiConv1d, slots: int) -> None:
        conv = layer.conv
        if not layer.causal or conv.stride[0] != 1 or conv.padding[0] != 0:
            raise ValueError("streaming needs causal, stride-1, unpadded decoder convolutions")
        if layer.pad_mode != "constant":
            # The one-shot path pads the start with zeros only in "constant" mode; other modes would
            # make the first frame's left context depend on the frame itself.
            raise ValueError(f"streaming needs pad_mode='constant', got {layer.pad_mode!r}")
        self.conv = conv
        context = conv.dilation[0] * (conv.kernel_size[0] - 1)
        self.state = conv.weight.new_zeros(slots, conv.in_channels, context)

    def __call__(self, x: torch.Tensor, rows: Rows, go: torch.Tensor | None = None) -> torch.Tensor:
        width = self.state.shape[-1]
        if width == 0:
            return self.conv(x)
        padded = torch.cat([self.state[rows], x], dim=-1)
        _store(self.state, rows, padded[..., -width:], go)
        return self.conv(padded)


class _TransposedConv:
    """A causal ``MimiConvTranspose1d`` carrying each row's overlap tail: ``T`` samples in, ``T * stride`` out."""

    def __init__(self, layer: MimiConvTranspose1d, slots: int) -> None:
        conv = layer.conv
        if layer.padding_left != 0 or conv.padding[0] != 0 or conv.output_padding[0] != 0:
            raise ValueError("streaming needs transposed convolutions trimmed on the right only")
        self.conv = conv
        self.stride = conv.stride[0]
        self.kernel = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        # torch's transposed convolution takes a slow col2im path that costs ~10x a plain matmul when only a
        # few samples come in (as here, per frame), so the ungrouped case is a matmul plus an overlap-add.
        self.as_matmul = conv.groups == 1 and conv.dilation[0] == 1
        self.state = conv.weight.new_zeros(slots, conv.out_channels, self.kernel - self.stride)

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        """Transposed convolution, no bias: ``(B, C_in, T)`` -> ``(B, C_out, (T - 1) * stride + kernel)``."""
        conv = self.conv
        if not self.as_matmul:
            return F.conv_transpose1d(x, conv.weight, None, self.stride, 0, 0, conv.groups, conv.dilation)
        batch, n, stride, kernel = x.shape[0], x.shape[-1], self.stride, self.kernel
        blocks = -(-kernel // stride)  # kernel taps in stride-long blocks, the last one zero-padded
        # (B, T, C_in) @ (C_in, C_out * kernel): each input sample's contribution to `kernel` output samples.
        taps = (x.transpose(1, 2) @ conv.weight.flatten(1)).view(batch, n, conv.out_channels, kernel)
        taps = F.pad(taps, (0, blocks * stride - kernel))
        taps = taps.view(batch, n, conv.out_channels, blocks, stride).permute(3, 0, 2, 1, 4)
        y = x.new_zeros(batch, conv.out_channels, n + blocks - 1, stride)
        for block in range(blocks):
            y[:, :, block : block + n] += taps[block]
        return y.view(batch, conv.out_channels, -1)[..., : (n - 1) * stride + kernel]

    def __call__(self, x: torch.Tensor, rows: Rows, go: torch.Tensor | None = None) -> torch.Tensor:
        # Bias is added only to emitted samples, so a position that gathers from two calls gets it once.
        y = self._full(x)
        final = x.shape[-1] * self.stride
        y[..., : self.state.shape[-1]] += self.state[rows]
        _store(self.state, rows, y[..., final:], go)
        y = y[..., :final]
        return y if self.conv.bias is None else y + self.conv.bias[:, None]


class _Pointwise:
    """ELU or identity: no state."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor, rows: Rows, go: torch.Tensor | None = None) -> torch.Tensor:
        return self.layer(x)


class _ResidualBlock:
    """A ``MimiResnetBlock``: its causal convolutions keep their context; the skip add is pointwise."""

    def __init__(self, block: MimiResnetBlock, slots: int) -> None:
        self.block = [_stage(layer, slots) for layer in block.block]
        self.shortcut = _stage(block.shortcut, slots)

    def __call__(self, x: torch.Tensor, rows: Rows, go: torch.Tensor | None = None) -> torch.Tensor:
        y = x
        for stage in self.block:
            y = stage(y, rows, go)
        return self.shortcut(x, rows, go) + y

    def states(self) -> list[torch.Tensor]:
        return [t for stage in (*self.block, self.shortcut) for t in _states(stage)]


def _stage(layer: nn.Module, slots: int):
    if isinstance(layer, MimiConv1d):
        return _CausalConv(layer, slots)
    if isinstance(layer, MimiConvTranspose1d):
        return _TransposedConv(layer, slots)
    if isinstance(layer, MimiResnetBlock):
        return _ResidualBlock(layer, slots)
    if isinstance(layer, (nn.ELU, nn.Identity)):
        return _Pointwise(layer)
    raise TypeError(f"no streaming version of {type(layer).__name__}")


def _states(stage) -> list[torch.Tensor]:
    """The per-row state tensors of a stage (first dimension: the row)."""
    if hasattr(stage, "states"):
        return stage.states()
    return [stage.state] if hasattr(stage, "state") else []


class _CachedTransformer:
    """The decoder ``MimiTransformerModel`` run with a sliding-window key/value cache per row.

    HF masks with ``q - window < k <= q``: a position sees itself and the ``window - 1`` before it, so
    each row keeps that many past keys/values per layer (oldest first, the newest at the end) and
    counts its positions; a key before the row's first position is masked out. Rows at different
    positions share one call: each query is rotated at its own row's absolute position.
    """

    def __init__(self, transformer: nn.Module, slots: int) -> None:
        config = transformer.config
        self.layers = list(transformer.layers)
        # Older transformers releases kept the rotary embedding on each attention module.
        self.rotary = getattr(transformer, "rotary_emb", None) or self.layers[0].self_attn.rotary_emb
        self.window = config.sliding_window
        if not self.window or self.window < 1:
            raise ValueError(f"streaming needs a positive sliding_window, got {self.window!r}")
        self.keep = self.window - 1
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.kv_heads = config.num_key_value_heads
        self.groups = config.num_attention_heads // self.kv_heads
        self.scaling = getattr(attention, "scaling", self.head_dim**-0.5)
        weight = attention.k_proj.weight
        shape = (slots, self.kv_heads, self.keep, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in self.layers]
        self.values = [weight.new_zeros(shape) for _ in self.layers]
        #: (slots,) absolute position of each row's next input (= positions it has seen).
        self.position = torch.zeros(slots, dtype=torch.long, device=weight.device)

    def __call__(self, hidden: torch.Tensor, rows: Rows, go: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden``: ``(B, T, hidden_size)``, the next ``T`` positions of each row; returns the same shape."""
        batch, n = hidden.shape[:2]
        first = self.position[rows]  # (B,)
        positions = first[:, None] + torch.arange(n, device=hidden.device)  # (B, T)
        cos, sin = self.rotary(hidden, positions)
        # Buffer index j holds absolute position first - keep + j (j < keep), then the T new positions.
        key_positions = first[:, None] - self.keep + torch.arange(self.keep + n, device=hidden.device)
        offset = key_positions[:, None, :] - positions[:, :, None]  # (B, T, keep + T)
        mask = ((offset <= 0) & (offset > -self.window) & (key_positions[:, None, :] >= 0))[:, None]

        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attention = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(batch, n, -1, self.head_dim).transpose(1, 2)
            k = attention.k_proj(x).view(batch, n, -1, self.head_dim).transpose(1, 2)
            v = attention.v_proj(x).view(batch, n, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_all = torch.cat([keys[rows], k], dim=2)
            v_all = torch.cat([values[rows], v], dim=2)
            _store(keys, rows, k_all[:, :, -self.keep :], go)
            _store(values, rows, v_all[:, :, -self.keep :], go)
            out = F.scaled_dot_product_attention(
                q, repeat_kv(k_all, self.groups), repeat_kv(v_all, self.groups), attn_mask=mask, scale=self.scaling
            )
            out = attention.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
            hidden = residual + layer.self_attn_layer_scale(out)
            residual = hidden
            x = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = residual + layer.mlp_layer_scale(x)

        _store(self.position, rows, first + n, go)
        return hidden

    def states(self) -> list[torch.Tensor]:
        # Stale keys before a row's first position are masked, so resetting the position is enough;
        # they are still saved and restored with the row, as they are cheap to carry.
        return [*self.keys, *self.values, self.position]


def _decoder_parts(codec: nn.Module) -> tuple[nn.Module | None, nn.Module, nn.Module]:
    """(upsample, decoder transformer, SEANet decoder), in either transformers layout."""
    decoder = codec.decoder
    if hasattr(decoder, "decoder_seanet"):  # transformers 5: a MimiDecoderModel holds the three
        return decoder.upsample, decoder.decoder_transformer, decoder.decoder_seanet
    return codec.upsample, codec.decoder_transformer, decoder


class BatchedMimiDecoder:
    """Decodes the Mimi codes of up to ``slots`` streams at once, each row with its own streaming state.

    ``codec_model`` is a loaded ``transformers.MimiModel`` (``CsmForConditionalGeneration.codec_model``) in
    eval mode, on any device, in float32 or bfloat16; its weights are shared, not copied. State buffers live
    on the codec's device in its dtype, so build the decoder after the codec is on its final device and
    dtype. Not thread-safe: keep it on the thread that owns the model. Call :meth:`reset` on a row before a
    new utterance starts there (or :meth:`load` a saved one). The first calls on a fresh process pay
    one-off kernel set-up (seconds on a CPU): a server should decode a frame at start-up, then reset.
    """

    def __init__(self, codec_model: nn.Module, slots: int) -> None:
        config = codec_model.config
        if config.audio_channels != 1:
            raise ValueError(f"streaming decode is mono only, the codec has {config.audio_channels} channels")
        self.slots = slots
        self._quantizer = codec_model.quantizer
        upsample, transformer, seanet = _decoder_parts(codec_model)
        self._device = next(codec_model.parameters()).device
        with torch.inference_mode():
            self._upsample = _TransposedConv(upsample, slots) if upsample is not None else None
            self._transformer = _CachedTransformer(transformer, slots)
            self._seanet = [_stage(layer, slots) for layer in seanet.layers]
        # Samples per code frame, from the modules themselves: 2 (upsample) * 8 * 6 * 5 * 4 = 1920 for Mimi.
        self.frame_size: int = 1 if self._upsample is None else self._upsample.stride
        for stage in self._seanet:
            if isinstance(stage, _TransposedConv):
                self.frame_size *= stage.stride
        self.sample_rate: int = config.sampling_rate
        stages = [self._transformer, *self._seanet] + ([self._upsample] if self._upsample else [])
        self._states = [t for stage in stages for t in _states(stage)]
        # The codebooks' embedding tables are computed lazily by transformers (and cached by some
        # releases): compute them now, so a captured step never allocates the cache in its own pool.
        for quantizer in codec_model.quantizer.modules():
            if hasattr(quantizer, "embed_sum"):
                with torch.inference_mode():
                    quantizer.embed  # noqa: B018 - computed for its cache

    def buffers(self) -> list[torch.Tensor]:
        """Every per-row state tensor (first dimension: the row), allocated once."""
        return list(self._states)

    def _rows(self, rows) -> torch.Tensor:
        return torch.as_tensor(rows, dtype=torch.long, device=self._device).reshape(-1)

    @torch.inference_mode()
    def reset(self, rows) -> None:
        """Forget the utterances on ``rows`` (ints); their buffers are zeroed in place and reused."""
        index = self._rows(rows)
        for state in self._states:
            state[index] = 0

    @torch.inference_mode()
    def save(self, row: int) -> list[torch.Tensor]:
        """A copy of ``row``'s state, for :meth:`load` on any row later (a stream that leaves and returns)."""
        return [state[row].clone() for state in self._states]

    @torch.inference_mode()
    def load(self, row: int, saved: list[torch.Tensor]) -> None:
        for state, value in zip(self._states, saved):
            state[row] = value

    @torch.inference_mode()
    def copy(self, src: int, dst: int) -> None:
        """Row ``dst`` continues the utterance of row ``src`` (a stream moved to another slot)."""
        for state in self._states:
            state[dst] = state[src]

    def step(self, codes: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
        """One frame for each of the first ``B`` rows, in place, for a captured step: ``codes`` ``(B,
        num_codebooks)`` long on the codec's device, ``go`` ``(B,)`` bool (a row whose ``go`` is false keeps
        its state and its output is meaningless). Returns ``(B, frame_size)`` in the codec's dtype, on its
        device. Static shapes, no host sync. Call under ``torch.inference_mode()``."""
        return self._decode(codes[:, :, None], slice(0, codes.shape[0]), go)

    def decode(self, codes: torch.Tensor, rows) -> torch.Tensor:
        """Decode the next frames of the streams on ``rows``.

        ``codes``: integer codes in ``[0, codebook_size)``, shape ``(B, num_codebooks, n_frames)``, row ``b``
        continuing the utterance on state row ``rows[b]`` (distinct rows); ``n_frames >= 0``, the same for
        every row. Returns ``(B, n_frames * frame_size)`` new float32 samples at ``sample_rate`` on the CPU,
        a fresh tensor the caller owns. Every returned sample is final: later frames never change it.
        """
        if codes.dim() != 3:
            raise ValueError(f"codes must be (batch, num_codebooks, n), got {tuple(codes.shape)}")
        index = self._rows(rows)
        if len(index) != codes.shape[0]:
            raise ValueError(f"{codes.shape[0]} rows of codes for {len(index)} state rows")
        with torch.inference_mode():
            audio = self._decode(codes.to(device=self._device, dtype=torch.long), index)
        # Copied outside inference mode so the caller gets a normal tensor.
        return audio.to(device="cpu", dtype=torch.float32, copy=True)

    def _decode(self, codes: torch.Tensor, rows: Rows, go: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, n) codes -> (B, n * frame_size) samples in the codec's dtype and device."""
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], 0, device=self._device)
        x = self._quantizer.decode(codes)  # (B, hidden, n) latents at the frame rate
        if self._upsample is not None:
            x = self._upsample(x, rows, go)  # (B, hidden, n * latent_stride)
        x = self._transformer(x.transpose(1, 2), rows, go).transpose(1, 2)
        for stage in self._seanet:
            x = stage(x, rows, go)
        return x[:, 0]


class StreamingMimiDecoder:
    """Decodes one utterance's Mimi codes incrementally; outputs concatenate to the one-shot decode.

    One stream on a one-row :class:`BatchedMimiDecoder` (same arithmetic); call :meth:`reset` before
    each new utterance.
    """

    def __init__(self, codec_model: nn.Module) -> None:
        self._batch = BatchedMimiDecoder(codec_model, slots=1)
        self.frame_size = self._batch.frame_size
        self.sample_rate = self._batch.sample_rate

    def reset(self) -> None:
        """Forget the current utterance; buffers are zeroed in place and reused."""
        self._batch.reset([0])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode the next frames of the utterance.

        ``codes``: integer codes, shape ``(num_codebooks, n_frames)`` or ``(1, num_codebooks, n_frames)``,
        any ``n_frames >= 0`` per call. Returns the ``n_frames * frame_size`` new samples as a float32
        CPU tensor ``(n_frames * frame_size,)`` the caller owns.
        """
        if codes.dim() == 2:
            codes = codes[None]
        if codes.dim() != 3 or codes.shape[0] != 1:
            shape = tuple(codes.shape)
            raise ValueError(f"codes must be (num_codebooks, n) or (1, num_codebooks, n), got {shape}")
        return self._batch.decode(codes, [0])[0]
