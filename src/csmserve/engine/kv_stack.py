"""A Llama-style decoder stack run over an HF module's own weights, with pre-allocated KV caches in slots.

CSM's backbone and depth decoder are both stacks of ``CsmDecoderLayer`` (RMSNorm, GQA attention with
RoPE, SwiGLU MLP). Running them through ``transformers``' forward costs a mask, a cache object and a
dozen Python checks per call; here a call is the arithmetic only. The weights are the loaded
modules' parameters (nothing is copied), so this stays the model: the parity tests compare greedy
codes with ``model.generate`` token for token.

The cache has ``slots`` rows, one per stream, each ``max_len`` positions long plus one scratch
position (index ``max_len``) where rows that only pad a fixed-size batch write, so they never touch
a real position. Rows are independent: a row's outputs never depend on the other rows of a call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Rows of a call: a slice (a view of the cache, no copy) or a ``(B,)`` long tensor of slot indices.
Rows = slice | torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCachedStack:
    """Decoder layers + final norm with a static KV cache of ``slots`` rows of ``max_len`` positions.

    Three ways in, one layer body: :meth:`forward` (several positions, one start shared by the rows:
    prefill chunks and the depth decoder), :meth:`decode` (one position per row, each row at its own
    position: the batched backbone step) and :meth:`step` (:meth:`decode` with static shapes only, for
    ``torch.compile`` and CUDA graphs). Positions after a row's newest hold stale values and are never
    read. Not thread-safe; one owner.
    """

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, rotary_emb: nn.Module, max_len: int, slots: int = 1):
        first = layers[0].self_attn
        self.layers = list(layers)
        self.norm = norm
        self.max_len = max_len
        self.slots = slots
        self.scratch = max_len  # the padding rows' position
        self.head_dim = first.head_dim
        self.scaling = first.scaling
        self.num_heads = first.q_proj.out_features // self.head_dim
        self.num_kv_heads = first.k_proj.out_features // self.head_dim
        weight = first.q_proj.weight
        device, dtype = weight.device, weight.dtype
        shape = (slots, self.num_kv_heads, max_len + 1, self.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        positions = torch.arange(max_len + 1, device=device)[None]
        probe = torch.zeros(1, device=device, dtype=dtype)
        with torch.inference_mode():
            cos, sin = rotary_emb(probe, positions)
        # (max_len + 1, head_dim), in the model dtype, exactly as the HF rotary module computes them.
        self.cos, self.sin = cos[0].clone(), sin[0].clone()
        self.positions = torch.arange(max_len + 1, device=device)

    def _layers(self, hidden, cos, sin, write, read, mask, causal: bool) -> torch.Tensor:
        """The decoder body: ``write(i, k, v)`` stores a layer's new keys/values, ``read(i)`` returns the
        keys/values attention sees, under ``mask`` (or ``causal``)."""
        batch, length = hidden.shape[:2]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            write(i, k, v)
            keys, values = read(i)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=causal, scale=self.scaling,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            out = attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden = residual + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.norm(hidden)

    def forward(self, hidden: torch.Tensor, start: int, rows: Rows | None = None) -> torch.Tensor:
        """``hidden`` ``(B, L, hidden_size)`` at positions ``start .. start+L-1`` of each of ``rows``
        (default: the first ``B`` slots); writes their keys/values, returns the normed hidden states
        ``(B, L, hidden_size)``. A row sees exactly its positions ``0 .. start+L-1``."""
        batch, length = hidden.shape[:2]
        rows = slice(0, batch) if rows is None else rows
        end = start + length
        if end > self.max_len:
            raise ValueError(f"sequence of {end} positions exceeds the cache of {self.max_len}")
        cos = self.cos[start:end][None, None]
        sin = self.sin[start:end][None, None]
        if length == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:
            mask, causal = self.positions[:end][None, :] <= self.positions[start:end][:, None], False

        def write(i, k, v):
            self.keys[i][rows, :, start:end] = k
            self.values[i][rows, :, start:end] = v

        def read(i):
            return self.keys[i][rows, :, :end], self.values[i][rows, :, :end]

        return self._layers(hidden, cos, sin, write, read, mask, causal)

    def decode(self, hidden: torch.Tensor, rows: Rows, positions: torch.Tensor, span: int) -> torch.Tensor:
        """One token per row: ``hidden`` ``(B, 1, hidden_size)``, row ``b`` (slot ``rows[b]``) at position
        ``positions[b]`` (``(B,)`` long); ``span`` > every position (attention reads ``0 .. span-1``).
        Returns ``(B, 1, hidden_size)``."""
        cos = self.cos[positions][:, None, None]
        sin = self.sin[positions][:, None, None]
        mask = (self.positions[:span][None, :] <= positions[:, None])[:, None, None]
        if isinstance(rows, slice):
            index = torch.arange(rows.start or 0, rows.stop, device=hidden.device)
        else:
            index = rows

        def write(i, k, v):
            self.keys[i][index, :, positions] = k[:, :, 0]
            self.values[i][index, :, positions] = v[:, :, 0]

        def read(i):
            return self.keys[i][rows, :, :span], self.values[i][rows, :, :span]

        return self._layers(hidden, cos, sin, write, read, mask, False)

    def step(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` for the first ``B`` slots with static shapes only: cache writes are a scatter and
        attention spans the whole cache under a mask, so the graph never changes shape and
        ``torch.compile`` (and CUDA graphs) capture it once per batch size. Padding rows pass
        ``positions[b] = scratch``."""
        batch = hidden.shape[0]
        cos = self.cos.index_select(0, positions)[:, None, None]
        sin = self.sin.index_select(0, positions)[:, None, None]
        mask = (self.positions[None, :] <= positions[:, None])[:, None, None]
        index = positions.view(batch, 1, 1, 1).expand(batch, self.num_kv_heads, 1, self.head_dim)

        def write(i, k, v):
            self.keys[i][:batch].scatter_(2, index, k)
            self.values[i][:batch].scatter_(2, index, v)

        def read(i):
            return self.keys[i][:batch], self.values[i][:batch]

        return self._layers(hidden, cos, sin, write, read, mask, False)
