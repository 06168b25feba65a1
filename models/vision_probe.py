"""Attention mass on image tokens, read from inside chosen layers' own attention call.

MMSpec switches the whole model to eager attention to get attention weights. Instead, only
the probed layers get an attention function that runs SDPA as usual and, when armed, also
computes softmax(q k^T) for the queries of interest from the very query/key states SDPA
received (RoPE applied, cache appended, same mask), so every other layer keeps fast attention.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

PROBE_ATTENTION = "mmspec_vision_probe"


def _probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    probe: VisionProbe | None = getattr(module, "_mmspec_probe", None)
    if probe is not None and probe.armed:
        probe.record(module, query, key, attention_mask, kwargs.get("scaling"))
    return out


AttentionInterface.register(PROBE_ATTENTION, _probe_attention)


class VisionProbe:
    """Per-query attention mass on image keys, averaged over heads and probed layers.

    Example:
        probe = VisionProbe(target.text_layers(), layers=(-1,))
        probe.arm(vision_keys, last_only=True)   # (batch, kv_len) bool
        target.prefill(...)
        score = probe.take()                       # (batch, 1)
    """

    def __init__(self, text_layers: torch.nn.ModuleList, layers: tuple[int, ...] = (-1,)) -> None:
        if not layers:
            raise ValueError("the vision probe needs at least one layer")
        n = len(text_layers)
        for i in layers:
            if not -n <= i < n:
                raise ValueError(f"probe layer {i} out of range for a {n}-layer model")
            attn = text_layers[i].self_attn
            # a private config copy: only this layer dispatches to the probe function
            attn.config = copy.copy(attn.config)
            attn.config._attn_implementation = PROBE_ATTENTION
        self._attentions = [text_layers[i].self_attn for i in layers]  # `arm` attaches to them
        self.armed = False
        self._vision_keys: torch.Tensor | None = None  # (batch, kv_len) bool
        self._last_only = False
        self._mass: list[torch.Tensor] = []  # per probed layer: (batch, queries)

    def arm(self, vision_keys: torch.Tensor, last_only: bool) -> None:
        """Record the next forward: `vision_keys` marks image slots among all its keys."""
        # several probes may share a model (engines of several methods on one target): the
        # one armed last is the one its layers report to
        for attn in self._attentions:
            attn._mmspec_probe = self
        self.armed, self._vision_keys, self._last_only, self._mass = (
            True,
            vision_keys,
            last_only,
            [],
        )

    def take(self) -> torch.Tensor:
        """(batch, queries) mass of the recorded forward, then disarm."""
        if not self._mass:
            raise RuntimeError("the vision probe recorded nothing: was it armed?")
        mass = torch.stack(self._mass).mean(dim=0)
        self.armed, self._mass = False, []
        return mass

    @torch.no_grad()
    def record(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        """query (b, heads, q, d), key (b, kv_heads, kv, d), mask (b, 1, q, kv) or None."""
        q_len, kv_len = query.shape[2], key.shape[2]
        rows = slice(q_len - 1, q_len) if self._last_only else slice(0, q_len)
        q = query[:, :, rows].float()
        k = repeat_kv(key, getattr(module, "num_key_value_groups", 1)).float()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = q @ k.transpose(-1, -2) * scale  # (b, heads, rows, kv)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            # the mask builders hand SDPA a boolean mask (True = attend) when they can
            scores = scores.masked_fill(~attention_mask[:, :, rows, -kv_len:], float("-inf"))
        elif attention_mask is not None:
            scores = scores + attention_mask[:, :, rows, -kv_len:].float()
        else:  # SDPA's own causal path: query i sits at kv position kv_len - q_len + i
            pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[rows]
            future = torch.arange(kv_len, device=q.device)[None, :] > pos[:, None]
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        vision = self._vision_keys[:, None, None, :kv_len].to(probs.dtype)
        self._mass.append((probs * vision).sum(-1).mean(dim=1))  # (b, rows)
