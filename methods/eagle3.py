"""EAGLE-3: a draft head on fused low/mid/high target features, trained by training-time test.

Li et al., "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via
Training-Time Test" (2025); reference: SafeAILab/EAGLE `eagle/model/cnets.py` (inference)
and `eagle/traineagle3/` (training).

Features. The head reads three target hidden states, from a low, a middle and a high layer:
the reference takes the inputs of decoder layers 2, L//2 and L-3, i.e. the outputs of
layers (1, L//2 - 1, L - 4), which is what `feature_layers` returns for L >= 8. On shallower
targets (the tiny test models have L = 4) those collide, so there it takes the outputs of
layers (0, L//2 - 1, L - 2): still distinct low / middle / high ones, never the last
layer's. The resolved indices live in the head's `config.extra["feature_layers"]`, so a
saved head keeps reading the layers it was trained on.

Head. `fc` (3H -> H, no bias) fuses cat(low, mid, high) into one hidden state g. One
decoder layer (`midlayer`) reads cat(input_layernorm(embedding of token t+1),
hidden_norm(g_t)) - 2H wide, embeddings first - through its q/k/v projections, adds the
attention output to g_t (the residual is the hidden state, not the concatenation), then the
usual post-attention norm and MLP. Its output, un-normed, is the hidden state fed to the next
tree level; `lm_head(norm(output))` gives logits over a reduced draft vocabulary, mapped back
to target ids by `d2t` (target id = draft id + d2t[draft id]); `t2d` marks the target ids
the draft vocabulary holds. The target's own LM head is not used.

Draft vocabulary. As the reference: the `draft_vocab_size` commonest answer tokens of the
whole distilled data set, ids sorted ascending (`training/train_drafter.py` counts them and
calls `set_draft_vocab` before the first step; used on its own, `train_loss` falls back to
the first batch's counts, ties ordered by the target's summed next-token probability).
Default size: the reference's 32000 for large vocabularies, half the vocabulary for tiny
ones (<= 4096, so the mapping is exercised); `draft_vocab_size` >= the target vocabulary
gives the identity map.

Training-time test (`train_loss`), as the reference: step 0 is the usual EAGLE forward (at
position t: embedding of token t+1 and fused feature g_t, predicting token t+2). Step j
feeds the head's own step j-1 output at each position with the embedding of token t+1+j,
at rotary position t+j, predicting token t+2+j; each query attends to the causal prefix of
step 0's keys plus the keys of steps 1..j at its own position (their diagonal) - exactly
what a tree node sees at inference (the committed prefix, then its ancestors). Here the
steps share one KV cache and a mask instead of the reference's hand-written diagonal
attention: the same attention, at the cost of masked-out scores. Loss of step j: soft
cross-entropy against the target's distribution of token t+2+j restricted to the draft
vocabulary, on answer tokens whose target top-1 is in the draft vocabulary; total
sum_j 0.8**j * loss_j, `ttt_steps` (config extra, default 7) steps; no feature regression
and no feature noise (the reference has neither: TTT replaces the noise). "acc" is step 0's
top-1 agreement with the target's top-1 (full vocabulary) on answer tokens.

Drafting is EAGLE-2's dynamic tree (depth 3, top_k 8, total_token 30 by default).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from mmspec.methods.dynamic_tree import DynamicTreeDrafter
from mmspec.methods.head_config import DraftConfig, decoder_layer, rotary
from mmspec.methods.head_training import TeacherBatch
from mmspec.methods.kv_slots import additive_mask
from mmspec.methods.registry import register
from mmspec.models.feature_taps import EMBEDS, Feature
from mmspec.models.target import Target, cache_keyword

TTT_STEPS = 7
TTT_DECAY = 0.8  # weight of unrolled step j: 0.8 ** j
REFERENCE_DRAFT_VOCAB = 32000
SMALL_VOCAB = 4096  # at most this many target ids: draft vocabulary = half of them


def feature_layers(num_layers: int) -> tuple[int, int, int]:
    """Decoder layers whose outputs EAGLE-3 fuses (low, middle, high) on an L-layer target.

    L >= 8: the reference's inputs of layers (2, L//2, L-3) = outputs of (1, L//2-1, L-4).
    4 <= L < 8: (0, L//2-1, L-2), three distinct layers where the reference's collide.
    """
    if num_layers >= 8:
        return (1, num_layers // 2 - 1, num_layers - 4)
    if num_layers >= 4:
        return (0, num_layers // 2 - 1, num_layers - 2)
    raise ValueError(f"EAGLE-3 fuses three layers below the last; got a {num_layers}-layer target")


def default_draft_vocab(vocab_size: int) -> int:
    if vocab_size <= SMALL_VOCAB:
        return vocab_size // 2
    return min(vocab_size, REFERENCE_DRAFT_VOCAB)


def _target_layer_count(name: str) -> int:
    """The decoder-layer count of the target `name` (registry name, path or hub id), read
    from its config.json. Only for heads built from a bare DraftConfig (see `draft_config`)."""
    from transformers import AutoConfig

    from mmspec.models.loader import resolve_model_source

    if not name:
        raise ValueError(
            "an EAGLE-3 head needs config.extra['feature_layers'] or the target's name; "
            "build its config with Eagle3Head.draft_config(method, target)"
        )
    source, local = resolve_model_source(name)
    text = AutoConfig.from_pretrained(source, local_files_only=local).get_text_config()
    return int(text.num_hidden_layers)


def token_counts(batch: TeacherBatch) -> torch.Tensor:
    """(V,) float scores ranking target ids for the draft vocabulary, from one batch: the
    count of each answer token, plus (in [0, 0.5], so counts rank first) the target's summed
    next-token probability over all real positions, which orders ties and unseen tokens."""
    vocab = batch.logits.shape[-1]
    answers = batch.input_ids[batch.answer & batch.real]
    counts = torch.bincount(answers.flatten(), minlength=vocab).double()
    mass = torch.zeros(vocab, dtype=torch.float64, device=counts.device)
    logits = batch.logits[batch.real]
    for lo in range(0, logits.shape[0], 256):  # chunked: a full (N, V) softmax can be large
        mass += torch.softmax(logits[lo : lo + 256].float(), dim=-1).sum(0).double()
    return counts + 0.5 * mass / mass.max().clamp(min=1e-12)


class Eagle3Layer(nn.Module):
    """The reference's `midlayer`: a decoder layer whose attention reads 2H (embeddings, then
    the hidden state, each normed) and whose residual is the hidden state alone."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        layer = decoder_layer(config)
        h, d = config.hidden_size, config.head_dim
        bias = bool(config.extra.get("qkv_bias", False))  # the reference's have none
        attn = layer.self_attn
        attn.q_proj = nn.Linear(2 * h, config.num_attention_heads * d, bias=bias)
        attn.k_proj = nn.Linear(2 * h, config.num_key_value_heads * d, bias=bias)
        attn.v_proj = nn.Linear(2 * h, config.num_key_value_heads * d, bias=bias)
        self.self_attn = attn
        self.mlp = layer.mlp
        self.hidden_norm = copy.deepcopy(layer.input_layernorm)
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Any,
    ) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        # HF attention reshapes q/k/v by head_dim, so the 2H input needs nothing else
        attn, _ = self.self_attn(
            hidden_states=x,
            position_embeddings=position_embeddings,
            attention_mask=mask,
            **{cache_keyword(self.self_attn): cache},
        )
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Head(nn.Module):
    """fc-fused target features -> `midlayer` -> norm -> draft-vocabulary `lm_head`.

    State-dict keys are the reference's (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`,
    `t2d`) minus its frozen copy of the target's embedding table.
    """

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        extra = config.extra  # resolved in place, so the saved config.json records them
        vocab = config.vocab_size
        if "feature_layers" not in extra:
            extra["feature_layers"] = list(feature_layers(_target_layer_count(config.target)))
        extra["draft_vocab_size"] = min(
            vocab, int(extra.get("draft_vocab_size") or default_draft_vocab(vocab))
        )
        extra.setdefault("ttt_steps", TTT_STEPS)
        self.config = config
        self.target_features: tuple[Feature, ...] = tuple(int(i) for i in extra["feature_layers"])
        if len(self.target_features) != 3:
            raise ValueError(f"EAGLE-3 fuses three layers, got {self.target_features}")
        h, draft = config.hidden_size, extra["draft_vocab_size"]
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = copy.deepcopy(self.midlayer.post_attention_layernorm)
        nn.init.ones_(self.norm.weight)
        self.lm_head = nn.Linear(h, draft, bias=False)
        self.rotary = rotary(config)
        # until a vocabulary is chosen: the first `draft` target ids
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[:draft] = True
        self.register_buffer("d2t", torch.zeros(draft, dtype=torch.long))
        self.register_buffer("t2d", t2d)
        self.vocab_ready = draft == vocab  # the identity map needs no choosing
        self.register_load_state_dict_post_hook(_vocab_loaded)

    @classmethod
    def draft_config(cls, method: str, target: Target, **extra: Any) -> DraftConfig:
        """The head's DraftConfig for `target`, its feature layers read off the target."""
        extra.setdefault("feature_layers", list(feature_layers(len(target.text_layers()))))
        return DraftConfig.for_target(method, target, **extra)

    # ---- the draft vocabulary ----------------------------------------------------------------
    @property
    def draft_ids(self) -> torch.Tensor:
        """(draft_vocab,) the target id of each draft id."""
        return torch.arange(self.d2t.shape[0], device=self.d2t.device) + self.d2t

    @torch.no_grad()
    def set_draft_vocab(self, scores: torch.Tensor) -> None:
        """Keep the `draft_vocab_size` target ids of highest `scores` (V,), e.g. counts."""
        scores = scores.to(self.t2d.device, torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # data-parallel training: every process must pick the same vocabulary
            torch.distributed.all_reduce(scores)
        draft = self.d2t.shape[0]
        used = torch.sort(scores, descending=True, stable=True).indices[:draft].sort().values
        self.d2t.copy_(used - torch.arange(draft, device=used.device))
        self.t2d.zero_()
        self.t2d[used] = True
        self.vocab_ready = True

    # ---- the Head calls ------------------------------------------------------------------------
    def fuse(self, feats: dict[Feature, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat([feats[i] for i in self.target_features], dim=-1))

    def combine(
        self, embeds: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> torch.Tensor:
        # the norms are the block's: the residual needs the raw hidden state
        return torch.cat([embeds, hidden], dim=-1)

    def block(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: Any
    ) -> torch.Tensor:
        h = self.config.hidden_size
        return self.midlayer(x[..., :h], x[..., h:], self.rotary(x, positions), mask, cache)

    def draft_logp(self, out: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the draft vocabulary (…, draft_vocab)."""
        return torch.log_softmax(self.lm_head(self.norm(out)).float(), dim=-1)

    def logp(self, out: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Over the target vocabulary (…, V): ids outside the draft vocabulary get -inf."""
        lp = self.draft_logp(out)
        full = lp.new_full((*lp.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., self.draft_ids] = lp
        return full

    def prompt_inputs(
        self, embeds: torch.Tensor, hidden: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        positions = torch.arange(embeds.shape[0], device=embeds.device)
        return self.combine(embeds, hidden, None), positions, None

    # ---- training ------------------------------------------------------------------------------
    def unroll(
        self, embeds: torch.Tensor, hidden: torch.Tensor, counts: torch.Tensor, steps: int
    ) -> list[torch.Tensor]:
        """Training-time test forward: each unrolled step's output (b, m, h), steps 0..steps-1.

        Row-relative, right padded: hidden[:, t] is the fused feature at t, embeds[:, t] the
        embedding of token t+1 (b, m + steps - 1, h), rows hold counts[i] real positions.
        Step j at t reads the embedding of token t+1+j beside step j-1's output at t, at
        rotary position t+j, and sees step 0's keys up to t and steps 1..j's keys at t: what
        the tree node j levels below position t sees at inference.
        """
        b, m = hidden.shape[:2]
        dev = hidden.device
        t = torch.arange(m, device=dev)[None].expand(b, -1)
        real = t < counts[:, None]
        eye = torch.eye(m, dtype=torch.bool, device=dev)[None].expand(b, -1, -1)
        prefix = torch.tril(torch.ones(m, m, dtype=torch.bool, device=dev))[None] & real[:, None]
        cache = DynamicCache()  # every step's keys, appended step by step
        outs = []
        for j in range(steps):
            # a padding query sees itself at step 0 too, so no row of the mask is empty
            visible = torch.cat([prefix if j else prefix | eye, *[eye] * j], dim=-1)
            x = self.combine(embeds[:, j : j + m], hidden, None)
            hidden = self.block(x, t + j, additive_mask(visible, x.dtype), cache)
            outs.append(hidden)  # un-normed: the next step's hidden input, as in the tree
        return outs

    def train_loss(
        self, batch: TeacherBatch, embed: nn.Module, lm_head: nn.Module, noise: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Training-time test over `ttt_steps` unrolled steps (see the module docstring).

        `embed` and `lm_head` (the target's) are unused: image slots come embedded in
        batch.features[EMBEDS], and the head has its own LM head. `noise` is ignored: EAGLE-3
        trains without feature noise.
        """
        if not self.vocab_ready:
            self.set_draft_vocab(token_counts(batch))
        steps = int(self.config.extra["ttt_steps"])
        fused = self.fuse(batch.features)
        rows = batch.rows()
        dev = fused.device
        width = batch.real.shape[1]
        # row-relative position t of row i is batch column start_i + t; t < count_i are real
        start = torch.tensor([r.start for r in rows], device=dev)[:, None]
        counts = torch.tensor([r.stop - r.start - 1 for r in rows], device=dev)
        m = max(1, int(counts.max()))

        def column(offset: int, n: int = m) -> tuple[torch.Tensor, torch.Tensor]:
            col = start + torch.arange(n, device=dev)[None] + offset
            return col.clamp(max=width - 1), col < width

        def at(x: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
            return torch.gather(x, 1, col[..., None].expand(-1, -1, x.shape[-1]))

        # the embeddings of tokens 1 .. m + steps - 1 (past a row's end: ignored padding)
        embeds = at(batch.features[EMBEDS], column(1, m + steps - 1)[0])
        outs = self.unroll(embeds, at(fused, column(0)[0]), counts, steps)
        real = torch.arange(m, device=dev)[None] < counts[:, None]
        ids = self.draft_ids
        zero = fused.sum() * 0.0  # keeps the graph when a step has nothing to learn
        total, losses = zero, []
        parts: dict[str, float] = {}
        for j, out in enumerate(outs):
            # position t predicts token t+2+j: learn where that is an answer token
            col, inside = column(2 + j)
            valid = real & inside & torch.gather(batch.answer, 1, col)
            bi, ti = valid.nonzero(as_tuple=True)
            loss_j, acc_j = zero, 0.0
            if bi.numel():
                want = batch.logits[bi, column(1 + j)[0][bi, ti]].float()  # (N, V)
                top = want.argmax(-1)
                lp = self.draft_logp(out[bi, ti])  # (N, draft)
                acc_j = float((ids[lp.argmax(-1)] == top).float().mean())
                kept = self.t2d[top]  # the reference skips targets the draft vocab lacks
                if bool(kept.any()):
                    p = torch.softmax(want[kept][:, ids], dim=-1)
                    loss_j = -(p * lp[kept]).sum(-1).mean()
            total = total + TTT_DECAY**j * loss_j
            losses.append(float(loss_j.detach()))
            parts[f"acc_{j}" if j else "acc"] = acc_j
        parts.update({f"p_loss_{j}": v for j, v in enumerate(losses)})
        return total, parts

    # ---- reference checkpoints -------------------------------------------------------------
    @classmethod
    def from_reference(
        cls, raw: dict[str, Any], state: dict[str, torch.Tensor], target: Target, where: str
    ) -> tuple[DraftConfig, dict[str, torch.Tensor]]:
        """A reference EAGLE-3 checkpoint (LLaMA-style config.json with draft_vocab_size)."""
        from mmspec.methods.draft_checkpoint import CheckpointError, reference_config

        # SpecForge / vLLM heads may name the layers: indices of layer *inputs*
        named = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        if named:
            if len(named) != 3 or min(int(i) for i in named) < 1:
                raise CheckpointError(f"{where}: unusable eagle_aux_hidden_state_layer_ids {named}")
            layers = [int(i) - 1 for i in named]
        else:
            layers = list(feature_layers(len(target.text_layers())))
        vocab = raw.get("vocab_size")
        extra = {
            "feature_layers": layers,
            "draft_vocab_size": int(raw.get("draft_vocab_size") or vocab or 0),
            "qkv_bias": "midlayer.self_attn.q_proj.bias" in state,
        }
        config = reference_config("eagle3", raw, target, where, **extra)
        state = {k: v for k, v in state.items() if k != "embed_tokens.weight"}
        draft = extra["draft_vocab_size"]
        if draft == config.vocab_size and "d2t" not in state and "t2d" not in state:
            # a full-vocabulary head may leave its (identity) map out
            state["d2t"] = torch.zeros(draft, dtype=torch.long)
            state["t2d"] = torch.ones(draft, dtype=torch.bool)
        return config, state


def _vocab_loaded(module: nn.Module, incompatible: Any) -> None:
    # loaded d2t / t2d are a chosen vocabulary: training on must not re-pick it
    module.vocab_ready = True


@register("eagle3")
class Eagle3(DynamicTreeDrafter):
    head_cls = Eagle3Head
