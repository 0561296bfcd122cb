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


class _CausalConv:
    """A stride-1 causal ``MimiConv1d`` that keeps its last ``effective_kernel - 1`` input samples.

    At stride 1 the one-shot path's extra right padding (``_get_extra_padding_for_conv1d``) is zero, so
    ``T`` samples in give ``T`` samples out, aligned with the input.
    """

    def __init__(self, layer: MimiConv1d) -> None:
        conv = layer.conv
        if not layer.causal or conv.stride[0] != 1 or conv.padding[0] != 0:
            raise ValueError("streaming needs causal, stride-1, unpadded decoder convolutions")
        if layer.pad_mode != "constant":
            # The one-shot path pads the start with zeros only in "constant" mode; other modes would
            # make the first frame's left context depend on the frame itself.
            raise ValueError(f"streaming needs pad_mode='constant', got {layer.pad_mode!r}")
        self.conv = conv
        context = conv.dilation[0] * (conv.kernel_size[0] - 1)
        self.context = conv.weight.new_zeros(1, conv.in_channels, context)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        width = self.context.shape[-1]
        if width == 0:
            return self.conv(x)
        padded = torch.cat([self.context, x], dim=-1)
        self.context.copy_(padded[..., -width:])
        return self.conv(padded)

    def reset(self) -> None:
        self.context.zero_()


class _TransposedConv:
    """A causal ``MimiConvTranspose1d`` carrying its overlap tail: ``T`` samples in, ``T * stride`` out."""

    def __init__(self, layer: MimiConvTranspose1d) -> None:
        conv = layer.conv
        if layer.padding_left != 0 or conv.padding[0] != 0 or conv.output_padding[0] != 0:
            raise ValueError("streaming needs transposed convolutions trimmed on the right only")
        self.conv = conv
        self.stride = conv.stride[0]
        self.kernel = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        # torch's transposed convolution takes a slow col2im path that costs ~10x a plain matmul when only a
        # few samples come in (as here, per frame), so the ungrouped case is a matmul plus an overlap-add.
        self.as_matmul = conv.groups == 1 and conv.dilation[0] == 1
        self.tail = conv.weight.new_zeros(1, conv.out_channels, self.kernel - self.stride)

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        """Transposed convolution, no bias: ``(1, C_in, T)`` -> ``(1, C_out, (T - 1) * stride + kernel)``."""
        conv = self.conv
        if not self.as_matmul:
            return F.conv_transpose1d(x, conv.weight, None, self.stride, 0, 0, conv.groups, conv.dilation)
        n, stride, kernel = x.shape[-1], self.stride, self.kernel
        blocks = -(-kernel // stride)  # kernel taps in stride-long blocks, the last one zero-padded
        # (T, C_in) @ (C_in, C_out * kernel): each input sample's contribution to `kernel` output samples.
        taps = (x[0].t() @ conv.weight.flatten(1)).view(n, conv.out_channels, kernel)
        taps = F.pad(taps, (0, blocks * stride - kernel))
        taps = taps.view(n, conv.out_channels, blocks, stride).permute(2, 1, 0, 3)
        y = x.new_zeros(conv.out_channels, n + blocks - 1, stride)
        for block in range(blocks):
            y[:, block : block + n] += taps[block]
        return y.view(1, conv.out_channels, -1)[..., : (n - 1) * stride + kernel]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Bias is added only to emitted samples, so a position that gathers from two calls gets it once.
        y = self._full(x)
        final = x.shape[-1] * self.stride
        y[..., : self.tail.shape[-1]] += self.tail
        self.tail.copy_(y[..., final:])
        y = y[..., :final]
        return y if self.conv.bias is None else y + self.conv.bias[:, None]

    def reset(self) -> None:
        self.tail.zero_()


class _ResidualBlock:
    """A ``MimiResnetBlock``: its causal convolutions keep their context; the skip add is pointwise."""

    def __init__(self, block: MimiResnetBlock) -> None:
        self.block = [_stage(layer) for layer in block.block]
        self.shortcut = _stage(block.shortcut)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for stage in self.block:
            y = stage(y)
        return self.shortcut(x) + y

    def reset(self) -> None:
        for stage in (*self.block, self.shortcut):
            if hasattr(stage, "reset"):
                stage.reset()


def _stage(layer: nn.Module):
    if isinstance(layer, MimiConv1d):
        return _CausalConv(layer)
    if isinstance(layer, MimiConvTranspose1d):
        return _TransposedConv(layer)
    if isinstance(layer, MimiResnetBlock):
        return _ResidualBlock(layer)
    if isinstance(layer, (nn.ELU, nn.Identity)):
        return layer  # pointwise: no state
    raise TypeError(f"no streaming version of {type(layer).__name__}")


class _CachedTransformer:
    """The decoder ``MimiTransformerModel`` run with a sliding-window key/value cache.

    HF masks with ``q - window < k <= q``: a position sees itself and the ``window - 1`` before it, so
    that many past keys/values are kept per layer. The buffer holds up to ``capacity`` positions and is
    compacted (the last ``window - 1`` moved to the front) only when full, not on every call.
    """

    def __init__(self, transformer: nn.Module) -> None:
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
        self.dtype, self.device = weight.dtype, weight.device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(2 * self.keep + 64)
        self.length = 0  # valid positions in the buffers: absolute positions [position - length, position)
        self.position = 0  # absolute position of the next input

    def _allocate(self, capacity: int) -> None:
        shape = (1, self.kv_heads, capacity, self.head_dim)
        old = list(zip(self.keys, self.values))
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        for (k_old, v_old), k_new, v_new in zip(old, self.keys, self.values):
            k_new[:, :, : self.length] = k_old[:, :, : self.length]
            v_new[:, :, : self.length] = v_old[:, :, : self.length]

    def _make_room(self, n: int) -> None:
        capacity = self.keys[0].shape[2]
        if self.length + n <= capacity:
            return
        kept = min(self.length, self.keep)
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                # clone: source and destination ranges may overlap
                buffer[:, :, :kept] = buffer[:, :, self.length - kept : self.length].clone()
        self.length = kept
        if kept + n > capacity:
            self._allocate(2 * (kept + n))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden``: ``(1, T, hidden_size)`` at the next ``T`` positions; returns the same shape."""
        n = hidden.shape[1]
        self._make_room(n)
        start, end = self.length, self.length + n
        first = max(0, start - self.keep)  # oldest buffered position any new query can see
        positions = torch.arange(self.position, self.position + n, device=hidden.device)
        cos, sin = self.rotary(hidden, positions[None])
        key_positions = torch.arange(first - start, n, device=hidden.device) + self.position
        offset = key_positions[None, :] - positions[:, None]
        mask = (offset <= 0) & (offset > -self.window)

        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attention = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(1, n, -1, self.head_dim).transpose(1, 2)
            k = attention.k_proj(x).view(1, n, -1, self.head_dim).transpose(1, 2)
            v = attention.v_proj(x).view(1, n, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            k_all = repeat_kv(keys[:, :, first:end], self.groups)
            v_all = repeat_kv(values[:, :, first:end], self.groups)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=self.scaling)
            out = attention.o_proj(out.transpose(1, 2).reshape(1, n, -1))
            hidden = residual + layer.self_attn_layer_scale(out)
            residual = hidden
            x = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = residual + layer.mlp_layer_scale(x)

        self.length = end
        self.position += n
        return hidden

    def reset(self) -> None:
        # Stale entries past `length` are never read, so the buffers need no clearing.
        self.length = 0
        self.position = 0


def _decoder_parts(codec: nn.Module) -> tuple[nn.Module | None, nn.Module, nn.Module]:
    """(upsample, decoder transformer, SEANet decoder), in either transformers layout."""
    decoder = codec.decoder
    if hasattr(decoder, "decoder_seanet"):  # transformers 5: a MimiDecoderModel holds the three
        return decoder.upsample, decoder.decoder_transformer, decoder.decoder_seanet
    return codec.upsample, codec.decoder_transformer, decoder


class StreamingMimiDecoder:
    """Decodes one utterance's Mimi codes incrementally; outputs concatenate to the one-shot decode.

    ``codec_model`` is a loaded ``transformers.MimiModel`` (``CsmForConditionalGeneration.codec_model``) in
    eval mode, on any device, in float32 or bfloat16; its weights are shared, not copied. State buffers live
    on the codec's device in its dtype, so build the decoder after the codec is on its final device and
    dtype. One instance serves one stream at a time and is not thread-safe: keep it on the thread that owns
    the model and call :meth:`reset` before each new utterance. The first calls on a fresh process pay
    one-off kernel set-up (seconds on a CPU): a server should decode a frame at start-up, then reset.
    """

    def __init__(self, codec_model: nn.Module) -> None:
        config = codec_model.config
        if config.audio_channels != 1:
            raise ValueError(f"streaming decode is mono only, the codec has {config.audio_channels} channels")
        self._quantizer = codec_model.quantizer
        upsample, transformer, seanet = _decoder_parts(codec_model)
        self._device = next(codec_model.parameters()).device
        with torch.inference_mode():
            self._upsample = _TransposedConv(upsample) if upsample is not None else None
            self._transformer = _CachedTransformer(transformer)
            self._seanet = [_stage(layer) for layer in seanet.layers]
        # Samples per code frame, from the modules themselves: 2 (upsample) * 8 * 6 * 5 * 4 = 1920 for Mimi.
        self.frame_size: int = 1 if self._upsample is None else self._upsample.stride
        for stage in self._seanet:
            if isinstance(stage, _TransposedConv):
                self.frame_size *= stage.stride
        self.sample_rate: int = config.sampling_rate

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget the current utterance; buffers are zeroed in place and reused."""
        stages = [self._transformer, *self._seanet]
        if self._upsample is not None:
            stages.append(self._upsample)
        for stage in stages:
            if hasattr(stage, "reset"):
                stage.reset()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode the next frames of the utterance.

        ``codes``: integer codes in ``[0, codebook_size)``, shape ``(num_codebooks, n_frames)`` or
        ``(1, num_codebooks, n_frames)``, preferably on the codec's device (moved there otherwise); any
        ``n_frames >= 0`` per call. Returns the ``n_frames * frame_size`` new samples at ``sample_rate``
        as a float32 tensor of shape ``(n_frames * frame_size,)`` on the CPU: a fresh, ordinary tensor
        the caller owns (not an inference tensor, so in-place edits work). Every returned sample is final:
        later frames never change it.
        """
        if codes.dim() == 2:
            codes = codes[None]
        if codes.dim() != 3 or codes.shape[0] != 1:
            shape = tuple(codes.shape)
            raise ValueError(f"codes must be (num_codebooks, n) or (1, num_codebooks, n), got {shape}")
        with torch.inference_mode():
            audio = self._decode(codes.to(device=self._device, dtype=torch.long))
        # Copied outside inference mode so the caller gets a normal tensor.
        return audio.to(device="cpu", dtype=torch.float32, copy=True)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(1, K, n) codes -> (n * frame_size,) samples in the codec's dtype and device."""
        if codes.shape[-1] == 0:
            return torch.zeros(0, device=self._device)
        x = self._quantizer.decode(codes)  # (1, hidden, n) latents at the frame rate
        if self._upsample is not None:
            x = self._upsample(x)  # (1, hidden, n * latent_stride)
        x = self._transformer(x.transpose(1, 2)).transpose(1, 2)
        for stage in self._seanet:
            x = stage(x)
        return x[0, 0]
