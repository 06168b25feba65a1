"""Building blocks of the trained draft heads (EAGLE-1/2/3, ViSpec, MSD), written once.

- `DraftConfig`: the shape of a head, read from its target and saved beside its weights.
- `decoder_layer`: one transformer layer of the target's own kind (Llama or Qwen2 blocks from
  transformers, plain 1D RoPE), so a head is what the reference checkpoints hold.
- `DraftKV`: the head's own KV cache over a ragged batch - append-only with a per-row mask of
  real slots, like the engine's, so the head reads each committed token once, not every step.
- `TreeSearch`: grows a draft tree from the head, statically (EAGLE-1's choice lists) or
  dynamically (EAGLE-2: expand the top_k likeliest nodes per level, keep the total_token
  likeliest overall), feeding tree levels into the cache and cropping them off afterwards.
- `pairs_*`: what a head is fed. EAGLE's input at position i is the embedding of token i+1
  beside the target's feature at i; image slots are embedded with the projected image
  features the target saw (the `EMBEDS` feature), so the head sees the picture too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from mmspec.methods.kv_slots import additive_mask, gather_slots, select_rows, squeeze_order
from mmspec.methods.target import Target
from mmspec.methods.tree import DraftTree

# text model type of the target -> the block family a head is built from
BLOCKS = {"llama": "llama", "qwen2": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen2_vl_text": "qwen2"}


@dataclass
class DraftConfig:
    """Shape of a draft head; saved as config.json beside model.safetensors."""

    method: str
    block: str  # "llama" | "qwen2"
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    target: str = ""  # the target it was trained for (name or path), for the record
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific shape (e.g. num_q)

    @classmethod
    def for_target(cls, method: str, target: Target, **extra: Any) -> DraftConfig:
        text = target.model.config.get_text_config()
        block = BLOCKS.get(text.model_type)
        if block is None:
            raise ValueError(f"no draft-head block for text model type {text.model_type!r}")
        rope = getattr(text, "rope_parameters", None) or {}
        return cls(
            method=method,
            block=block,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None)
            or text.hidden_size // text.num_attention_heads,
            vocab_size=text.vocab_size,
            rms_norm_eps=text.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
            target=getattr(target, "name", ""),
            extra=dict(extra),
        )

    def hf_config(self) -> LlamaConfig | Qwen2Config:
        common = dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            num_hidden_layers=1,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        config = LlamaConfig(**common) if self.block == "llama" else Qwen2Config(**common)
        config._attn_implementation = "sdpa"
        return config

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "config.json") -> DraftConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(
            f.name
            for f in fields(cls)
            if f.name not in data and f.default is MISSING and f.default_factory is MISSING
        )
        if unknown or missing:
            raise ValueError(f"{where}: unexpected keys {unknown}, missing keys {missing}")
        return cls(**data)


def decoder_layer(config: DraftConfig) -> nn.Module:
    """One decoder layer of the target's block family (attention + MLP + their norms)."""
    hf = config.hf_config()
    return LlamaDecoderLayer(hf, 0) if config.block == "llama" else Qwen2DecoderLayer(hf, 0)


def rotary(config: DraftConfig) -> nn.Module:
    hf = config.hf_config()
    return LlamaRotaryEmbedding(hf) if config.block == "llama" else Qwen2RotaryEmbedding(hf)


# ---- the head's cache over a ragged batch -----------------------------------------------------


class DraftKV:
    """KV cache of a one-layer draft head for the rows of a batch.

    `feed` appends m slots per row (row i's first counts[i] real, the rest masked padding);
    `crop` drops slots appended after a given length (tree levels after drafting).
    """

    def __init__(self, batch: int, device: torch.device, compact_slack: int = 64) -> None:
        self.cache = DynamicCache()
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.compact_slack = compact_slack

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def visible_for(self, new_visible: torch.Tensor) -> torch.Tensor:
        """(b, q, length + q) bool: every valid cached slot, then `new_visible` (b, q, q)."""
        q = new_visible.shape[1]
        return torch.cat([self.valid[:, None, :].expand(-1, q, -1), new_visible], dim=-1)

    def append_valid(self, kept: torch.Tensor) -> None:
        self.valid = torch.cat([self.valid, kept], dim=1)

    def crop(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
        self.valid = self.valid[:, :length]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (indices into the current rows)."""
        select_rows(self.cache, keep)
        self.valid = self.valid.index_select(0, keep)
        self.next_pos = self.next_pos.index_select(0, keep)

    def maybe_compact(self) -> None:
        """Squeeze masked slots out once they cost more than `compact_slack` per row."""
        order = squeeze_order(self.valid, self.compact_slack)
        if order is not None:
            gather_slots(self.cache, order)
            self.valid = torch.gather(self.valid, 1, order)


def ragged(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Right-pad per-row (n_i, ...) tensors to (b, max n, ...); returns the counts too."""
    counts = [r.shape[0] for r in rows]
    out = rows[0].new_zeros(len(rows), max(counts), *rows[0].shape[1:])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, counts


def feed(
    kv: DraftKV,
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    positions: torch.Tensor,
    counts: Sequence[int],
) -> torch.Tensor:
    """Run the head over m new positions per row (causal), appending them to the cache.

    `step(inputs, positions, mask)` runs the head on `kv.cache` and returns its (b, m, h)
    output. Row i's slots past counts[i] are padding: computed, then masked forever. The
    next position of a row is one past its last real one.
    """
    m = inputs.shape[1]
    dev = inputs.device
    counts_t = torch.tensor(list(counts), device=dev)
    real = torch.arange(m, device=dev)[None, :] < counts_t[:, None]  # (b, m)
    causal = torch.tril(torch.ones(m, m, dtype=torch.bool, device=dev))
    # a padding query sees itself, so no row of the mask is empty (NaN-free)
    new_visible = (causal[None] & real[:, None, :]) | torch.eye(m, dtype=torch.bool, device=dev)
    mask = additive_mask(kv.visible_for(new_visible), inputs.dtype)
    out = step(inputs, positions, mask)
    kv.append_valid(real)
    kv.next_pos = last_real(positions[..., None], counts)[:, 0] + 1
    return out


def last_real(out: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """(b, m, h) -> (b, h): each row's output at its last real position."""
    idx = torch.tensor([c - 1 for c in counts], device=out.device)
    return out[torch.arange(out.shape[0], device=out.device), idx]


# ---- growing the tree -------------------------------------------------------------------------


@dataclass
class _Node:
    token: int
    parent: int  # index into the candidate list, -1 = root
    score: float  # cumulative log-probability from the root
    depth: int


class TreeSearch:
    """Grows draft trees for a batch from a head, one tree level per head forward.

    `expand(tokens, parent_hidden, mask, positions)` runs the head over one level: tokens
    (b, n), the head output at each node's parent (b, n, h), the additive mask over the cache
    plus this level, positions (b, n); it returns (log-probs (b, n, V), output (b, n, h)).
    Level slots go into the cache while the tree grows (each node sees its ancestors) and are
    cropped off at the end.
    """

    def __init__(
        self,
        expand: Callable[
            [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
            tuple[torch.Tensor, torch.Tensor],
        ],
        kv: DraftKV,
    ) -> None:
        self.expand = expand
        self.kv = kv

    def _level(
        self, tokens: torch.Tensor, parent_hidden: torch.Tensor, anc: torch.Tensor, depth: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed one level; `anc` (b, n, tree slots so far) marks each node's ancestors.

        Returns log-probs, outputs and the visibility of the level's own nodes over all tree
        slots including theirs (b, n, slots + n), from which their children's `anc` is taken.
        """
        b, n = tokens.shape
        dev = tokens.device
        start = self.kv.length - anc.shape[-1]
        own = torch.cat(
            [anc, torch.eye(n, dtype=torch.bool, device=dev)[None].expand(b, -1, -1)], -1
        )
        base = self.kv.valid[:, None, :start].expand(-1, n, -1)
        mask = additive_mask(torch.cat([base, own], dim=-1), parent_hidden.dtype)
        positions = self.kv.next_pos[:, None] + depth - 1
        lp, out = self.expand(tokens, parent_hidden, mask, positions.expand(-1, n))
        self.kv.append_valid(torch.zeros(b, n, dtype=torch.bool, device=dev))
        return lp, out, own

    def dynamic(
        self,
        logp: torch.Tensor,
        hidden: torch.Tensor,
        depth: int,
        top_k: int,
        total_token: int,
        threshold: float = 1.0,
    ) -> list[DraftTree]:
        """EAGLE-2, from `logp` (b, V) and head output (b, h) after the pending token.

        Level 1 holds the top_k children of the root. Then `depth` times: the top_k likeliest
        nodes of the newest level (by cumulative log-probability) are fed to the head and
        each brings its top_k children as the next level. The tree keeps the `total_token - 1`
        likeliest candidates (the root is the first of the total, as in the reference); an
        ancestor scores at least as high as its descendants, so they form a tree.

        `threshold` < 1 is MMSpec's confidence variant: a row stops growing once no node of
        its newest level has a cumulative probability above it, and keeps only the nodes
        above it (but at least top_k, at most total_token - 1).
        """
        b, dev = logp.shape[0], logp.device
        log_t = math.log(threshold) if threshold < 1.0 else None
        start = self.kv.length
        top = logp.topk(top_k, dim=-1)
        cands = [
            [_Node(int(t), -1, float(s), 1) for t, s in zip(top.indices[i], top.values[i])]
            for i in range(b)
        ]
        grows = [log_t is None or max(n.score for n in c) >= log_t for c in cands]
        frontier = torch.arange(top_k, device=dev)[None].expand(b, -1)  # candidate indices
        tokens, scores = top.indices, top.values
        parent_hidden = hidden[:, None, :].expand(-1, top_k, -1)
        anc = torch.zeros(b, top_k, 0, dtype=torch.bool, device=dev)
        for d in range(1, depth + 1):
            if not any(grows):
                break
            lp, out, own = self._level(tokens, parent_hidden, anc, d)
            child = lp.topk(top_k, dim=-1)  # (b, k, k)
            cum = (scores[:, :, None] + child.values).flatten(1)  # (b, k * k)
            child_tokens = child.indices.flatten(1)
            base = torch.tensor([len(c) for c in cands], device=dev)[:, None]
            for i in range(b):
                if not grows[i]:  # stopped rows are computed along, never extended
                    continue
                parents = frontier[i].repeat_interleave(top_k).tolist()
                cands[i] += [
                    _Node(t, p, s, d + 1)
                    for t, p, s in zip(child_tokens[i].tolist(), parents, cum[i].tolist())
                ]
                grows[i] = log_t is None or float(cum[i].max()) >= log_t
            if d == depth:
                break
            best = cum.topk(top_k, dim=-1).indices  # (b, k) into this level's k * k
            parent_of = best // top_k  # the node of this level each new frontier node is under
            frontier = base + best
            tokens, scores = child_tokens.gather(1, best), cum.gather(1, best)
            anc = own.gather(1, parent_of[:, :, None].expand(-1, -1, own.shape[-1]))
            parent_hidden = out.gather(1, parent_of[:, :, None].expand(-1, -1, out.shape[-1]))
        self.kv.crop(start)
        trees = []
        for c in cands:
            keep = total_token - 1
            if log_t is not None:
                above = sum(n.score > log_t for n in c)
                keep = min(keep, max(above, top_k))
            trees.append(_select(c, keep))
        return trees

    def static(
        self, logp: torch.Tensor, hidden: torch.Tensor, choices: Sequence[Sequence[int]]
    ) -> list[DraftTree]:
        """A fixed tree (EAGLE-1, Medusa style): choice (c1, c2, ...) is the c1-th likeliest
        child of the root, then its c2-th likeliest child, and so on. `choices` must hold
        every prefix of every choice."""
        b, dev = logp.shape[0], logp.device
        start = self.kv.length
        paths = sorted({tuple(c) for c in choices}, key=lambda c: (len(c), c))
        index = {p: i for i, p in enumerate(paths)}
        missing = [p for p in paths if len(p) > 1 and p[:-1] not in index]
        if missing:
            raise ValueError(f"tree choices miss the parents of {missing[:3]}")
        width = max(max(p) for p in paths) + 1
        tokens = torch.zeros(b, len(paths), dtype=torch.long, device=dev)
        first = logp.topk(width, dim=-1).indices
        level = [p for p in paths if len(p) == 1]
        for p in level:
            tokens[:, index[p]] = first[:, p[0]]
        # per fed node: its ancestors-or-self over the tree slots, and its head output
        own_of: dict[tuple[int, ...], torch.Tensor] = {}
        hidden_of: dict[tuple[int, ...], torch.Tensor] = {(): hidden}
        slots = 0
        depth = 1
        while True:
            parents = [p for p in level if any(c[:-1] == p for c in paths if len(c) == depth + 1)]
            if not parents:
                break
            none = torch.zeros(b, 0, dtype=torch.bool, device=dev)  # children of the root
            above = [own_of.get(p[:-1], none) for p in parents]
            anc = torch.stack([F.pad(x, (0, slots - x.shape[-1])) for x in above], dim=1)
            ph = torch.stack([hidden_of[p[:-1]] for p in parents], dim=1)
            lp, out, own = self._level(tokens[:, [index[p] for p in parents]], ph, anc, depth)
            top = lp.topk(width, dim=-1).indices  # (b, n, width)
            for j, p in enumerate(parents):
                own_of[p], hidden_of[p] = own[:, j], out[:, j]
            slots += len(parents)
            depth += 1
            level = [c for c in paths if len(c) == depth]
            for c in level:
                tokens[:, index[c]] = top[:, parents.index(c[:-1]), c[-1]]
        self.kv.crop(start)
        parent_idx = [index[p[:-1]] if len(p) > 1 else -1 for p in paths]
        return [DraftTree(tokens[i].tolist(), parent_idx) for i in range(b)]


def _select(cands: list[_Node], total: int) -> DraftTree:
    """The `total` likeliest candidates as a DraftTree (parents first, likeliest child first)."""
    order = sorted(range(len(cands)), key=lambda i: (-cands[i].score, cands[i].depth, i))
    kept: set[int] = set()
    for i in order:
        if len(kept) == total:
            break
        if cands[i].parent < 0 or cands[i].parent in kept:
            kept.add(i)
    chosen = sorted(kept, key=lambda i: (cands[i].depth, -cands[i].score, i))
    index = {c: n for n, c in enumerate(chosen)}
    return DraftTree(
        [cands[c].token for c in chosen],
        [index[cands[c].parent] if cands[c].parent >= 0 else -1 for c in chosen],
    )


def load_state(
    module: nn.Module, state: dict[str, torch.Tensor], where: str, strict: bool = True
) -> None:
    """Load `state` into `module`, naming every missing, unexpected or misshapen key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if (strict and (missing or unexpected)) or shapes:
        raise ValueError(
            f"{where}: checkpoint does not fit the head: missing keys {missing}, "
            f"unexpected keys {unexpected}, wrong shapes {shapes}"
        )
    module.load_state_dict(state, strict=strict)


def save_head(module: nn.Module, config: DraftConfig, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(config.to_json())
