"""A Llama-style decoder stack run over an HF module's own weights, with a pre-allocated KV cache.

CSM's backbone and depth decoder are both stacks of ``CsmDecoderLayer`` (RMSNorm, GQA attention with
RoPE, SwiGLU MLP). Running them through ``transformers``' forward costs a mask, a cache object and a
dozen Python checks per call; here a call is the arithmetic only. The weights are the loaded
modules' parameters (nothing is copied), so this stays the model: the parity tests compare greedy
codes with ``model.generate`` token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCachedStack:
    """Decoder layers + final norm with a static KV cache of ``max_len`` positions (batch 1).

    ``forward(hidden, start)`` takes ``hidden`` of shape ``(1, L, hidden_size)`` for positions
    ``start .. start+L-1``, writes their keys/values into the cache and returns the normed hidden
    states ``(1, L, hidden_size)``. Positions after ``start+L`` hold stale values and are never read:
    a call at ``start`` sees exactly positions ``0 .. start+L-1``. Not thread-safe; one owner.
    """

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, rotary_emb: nn.Module, max_len: int):
        first = layers[0].self_attn
        self.layers = list(layers)
        self.norm = norm
        self.max_len = max_len
        self.head_dim = first.head_dim
        self.scaling = first.scaling
        self.num_heads = first.q_proj.out_features // self.head_dim
        self.num_kv_heads = first.k_proj.out_features // self.head_dim
        weight = first.q_proj.weight
        device, dtype = weight.device, weight.dtype
        shape = (1, self.num_kv_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        positions = torch.arange(max_len, device=device)[None]
        probe = torch.zeros(1, device=device, dtype=dtype)
        with torch.inference_mode():
            cos, sin = rotary_emb(probe, positions)
        # (max_len, head_dim), in the model dtype, exactly as the HF rotary module computes them.
        self.cos, self.sin = cos[0].clone(), sin[0].clone()
        self.positions = torch.arange(max_len, device=device)

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        length = hidden.shape[1]
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
            rows = torch.arange(start, end, device=hidden.device)[:, None]
            cols = torch.arange(end, device=hidden.device)[None, :]
            mask, causal = cols <= rows, False
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(1, length, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q,
                self.keys[i][:, :, :end],
                self.values[i][:, :, :end],
                attn_mask=mask,
                is_causal=causal,
                scale=self.scaling,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            out = attn.o_proj(out.transpose(1, 2).reshape(1, length, -1))
            hidden = residual + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.norm(hidden)

    def step(self, hidden: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One token ``(1, 1, hidden)`` at ``position`` (a 0-d long tensor), with static shapes only.

        Same arithmetic as :meth:`forward` for one token, but the cache write is an ``index_copy_``
        and attention spans the whole cache under a mask, so the graph never changes shape: this is
        the form ``torch.compile`` (and CUDA graphs) can capture once and replay every step.
        """
        index = position.view(1)
        cos = self.cos.index_select(0, index)[None, None]
        sin = self.sin.index_select(0, index)[None, None]
        mask = (self.positions <= position)[None, None, None, :]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(1, 1, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.keys[i].index_copy_(2, index, k)
            self.values[i].index_copy_(2, index, v)
            out = F.scaled_dot_product_attention(
                q, self.keys[i], self.values[i], attn_mask=mask, scale=self.scaling,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            out = attn.o_proj(out.transpose(1, 2).reshape(1, 1, -1))
            hidden = residual + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.norm(hidden)
