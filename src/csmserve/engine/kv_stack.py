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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCachedStack:
    """Decoder layers + final norm with a static KV cache of ``slots`` rows of ``max_len`` positions.

    Three ways in, one layer body: :meth:`forward` (several positions, one start shared by the first
    rows: the depth decoder's frame), :meth:`prefill_rows` (prompt chunks of any slots, each at its own
    start, padded: the batched prefill) and :meth:`step` (one position per row for the first ``B`` slots,
    static shapes only: the backbone's frame step, captured in a CUDA graph). Positions after a row's
    newest hold stale values and are never read. Not thread-safe; one owner.
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

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """``hidden`` ``(B, L, hidden_size)`` at positions ``start .. start+L-1`` of each of the first ``B``
        slots; writes their keys/values, returns the normed hidden states ``(B, L, hidden_size)``. A row
        sees exactly its positions ``0 .. start+L-1``. Static for given ``B``, ``start`` and ``L``."""
        batch, length = hidden.shape[:2]
        rows = slice(0, batch)
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

    def prefill_rows(
        self, hidden: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, end: int
    ) -> torch.Tensor:
        """Prompt chunks of several rows in one call, each at its own start: ``hidden`` ``(N, L, hidden_size)``
        padded on the right, row ``n`` holding ``lengths[n]`` positions from ``starts[n]`` of slot
        ``slots[n]`` (all ``(N,)`` long, distinct slots); ``end``: the largest ``starts + lengths``, given
        by the host so nothing syncs. Writes the rows' keys/values (pads write to the scratch position)
        and returns the normed hidden states ``(N, L, hidden_size)`` (a pad's are meaningless). A row
        sees exactly its slot's positions ``0 .. its own position``."""
        length = hidden.shape[1]
        offsets = torch.arange(length, device=hidden.device)
        positions = starts[:, None] + offsets  # (N, L)
        real = offsets[None, :] < lengths[:, None]
        where = torch.where(real, positions, self.scratch)
        if end > self.max_len:
            raise ValueError(f"sequence of {end} positions exceeds the cache of {self.max_len}")
        cos = self.cos[where][:, None]  # (N, 1, L, head_dim)
        sin = self.sin[where][:, None]
        mask = (self.positions[:end][None, None, :] <= positions[:, :, None])[:, None]  # (N, 1, L, end)
        index = slots[:, None].expand_as(where)

        def write(i, k, v):  # (N, kv, L, d) -> the cache at (slot, position): index_put takes (N, L, kv, d)
            self.keys[i][index, :, where] = k.transpose(1, 2)
            self.values[i][index, :, where] = v.transpose(1, 2)

        def read(i):
            return self.keys[i][slots, :, :end], self.values[i][slots, :, :end]

        return self._layers(hidden, cos, sin, write, read, mask, False)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy positions ``0 .. length-1`` of slot ``src`` into slot ``dst`` (every layer)."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]

    def step(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of the first ``B`` slots, each at its own position: ``hidden`` ``(B, 1,
        hidden_size)``, ``positions`` ``(B,)`` long; returns ``(B, 1, hidden_size)``. Static shapes only:
        cache writes are a scatter and attention spans the whole cache under a mask, so the graph never
        changes shape and a CUDA graph captures it once per batch size. Rows that must not write a real
        position (not decoding this step) pass ``positions[b] = scratch``."""
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
