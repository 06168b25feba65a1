"""Attention mass on image tokens, read from inside chosen layers' own attention call.

MMSpec switches the whole model to eager attention to get attention weights. Instead, only
the probed layers get an attention function that runs SDPA as usual (models/attention.py)
and, when armed, also
computes softmax(q k^T) for the queries of interest from the very query/key states SDPA
received (RoPE applied, cache appended, same mask), so every other layer keeps fast attention.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AttentionInterface

from mmspec.models.attention import sdpa_attention

PROBE_ATTENTION = "mmspec_vision_probe"


def _probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    out = sdpa_attention(module, query, key, value, attention_mask, **kwargs)
    probe: VisionProbe | None = getattr(module, "_mmspec_probe", None)
    if probe is not None and probe.armed:
        probe.record(query, key, attention_mask, kwargs.get("scaling"))
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
        # per probed layer, what SDPA received: the softmax waits for `take`, which may ask
        # for one query per row (a verification needs only the last accepted node's)
        self._seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]] = []

    def arm(self, vision_keys: torch.Tensor, last_only: bool) -> None:
        """Record the next forward: `vision_keys` marks image slots among all its keys."""
        # several probes may share a model (engines of several methods on one target): the
        # one armed last is the one its layers report to
        for attn in self._attentions:
            attn._mmspec_probe = self
        self.armed, self._vision_keys, self._last_only, self._seen = (
            True,
            vision_keys,
            last_only,
            [],
        )

    def take(self, query: torch.Tensor | None = None) -> torch.Tensor:
        """Mass of the recorded forward, then disarm: (batch, queries) for every recorded
        query (the last one under `last_only`), or (batch,) for `query[i]`, a (batch,) long
        q-index per row."""
        if not self._seen:
            raise RuntimeError("the vision probe recorded nothing: was it armed?")
        masses = [self._mass(*seen, query) for seen in self._seen]
        mass = masses[0] if len(masses) == 1 else torch.stack(masses).mean(dim=0)
        self.armed, self._seen = False, []
        return mass

    def record(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        """query (b, heads, q, d), key (b, kv_heads, kv, d), mask (b, 1, q, kv) or None."""
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        self._seen.append((query, key, attention_mask, scale))

    @torch.no_grad()
    def _mass(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scale: float,
        pick: torch.Tensor | None,
    ) -> torch.Tensor:
        b, heads, q_len, d = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        if pick is not None:
            rows = pick.to(query.device)[:, None]  # (b, 1) q-index per row
        elif self._last_only:
            rows = torch.full((b, 1), q_len - 1, device=query.device)
        else:
            rows = None  # every query
        if rows is not None:
            query = query.gather(2, rows[:, None, :, None].expand(-1, heads, -1, d))
        n = query.shape[2]
        # grouped heads: query head h reads kv head h // groups, so fold the groups into the
        # query axis instead of copying the keys groups times (what repeat_kv would do)
        grouped = query.reshape(b, kv_heads, heads // kv_heads * n, d)
        scores = (grouped.float() @ key.float().transpose(-1, -2)).view(b, heads, n, kv_len)
        scores = scores * scale
        if attention_mask is not None:
            m = attention_mask[:, :, :, -kv_len:]
            if rows is not None:
                m = m.gather(2, rows[:, None, :, None].expand(-1, m.shape[1], -1, kv_len))
            if m.dtype == torch.bool:  # the mask builders hand SDPA True = attend when they can
                scores = scores.masked_fill(~m, float("-inf"))
            else:
                scores = scores + m.float()
        else:  # SDPA's own causal path: query i sits at kv position kv_len - q_len + i
            at = rows if rows is not None else torch.arange(q_len, device=query.device)[None]
            future = torch.arange(kv_len, device=query.device) > (at + kv_len - q_len)[..., None]
            scores = scores.masked_fill(future[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        vision = self._vision_keys[:, None, :kv_len, None].to(probs.dtype)  # (b, 1, kv, 1)
        mass = (probs @ vision)[..., 0].mean(dim=1)  # (b, rows)
        return mass[:, 0] if pick is not None else mass
