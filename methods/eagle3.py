"""EAGLE-3: a draft head on three fused target features, trained by training-time test.

Li et al., "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via
Training-Time Test" (2025); reference: SafeAILab/EAGLE `eagle/model/cnets.py` (inference)
and `eagle/traineagle3/` (training).

Features. MMSpec's rule (method/eagle3/spec_model.py), the default for new heads: the head
fuses the target's `hidden_states[0..2]` - the input embeddings (at image slots the
projected image features, our `EMBEDS` tap) and the outputs of decoder layers 0 and 1,
whatever the depth - with every image position's row set to zero; and at an image slot the
token embedding the head reads is that of the pad token (`image_slot_token`, MMSpec's
`tokenizer.pad_token_id or 0`), not the image features. So the head never sees the picture
itself, only what the target's text positions made of it. The config's
`feature_layers` names the three taps (`["embeds", 0, 1]`; an int is a decoder layer's output,
"final" the normed last hidden state), `zero_image_positions` and `image_slot_token` the
image rule, applied as for every EAGLE head (methods/head_image_slots.py: `prepare_features`
zeroes the rows, `token_embeddings` puts the pad token in, training and drafting alike; the
EAGLE-1/2 heads' rule differs, methods/eagle.py). Equal to MMSpec's on targets of 3 or
more layers (on fewer, its hs[2] is the normed last state), and for the prompt's image slots:
MMSpec would also zero the row of a generated token that equals the image-token id, ours
zeroes prompt slots only (no such token came up in the parity runs).

Heads trained before that rule hold three ints and no `zero_image_positions` (the outputs of
layers (1, L//2 - 1, L - 4), SafeAILab's inputs of layers 2, L//2 and L-3; (0, 1, 2) on the
4-layer tiny targets): they keep reading those outputs as tapped, image slots included. A
head can name any three taps (`head_args`), with or without the image rule.

Head. `fc` (3H -> H, no bias) fuses the cat of the three features into one hidden state g. One
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

from mmspec.methods.dynamic_tree import DynamicTreeDrafter
from mmspec.methods.head_config import DraftConfig, attend, decoder_layer, rotary
from mmspec.methods.head_image_slots import ImageSlotHead
from mmspec.methods.head_training import TeacherBatch
from mmspec.methods.kv_slots import SlotCache, additive_mask
from mmspec.methods.registry import register
from mmspec.models.feature_taps import EMBEDS, FINAL, Feature
from mmspec.models.target import Target

TTT_STEPS = 7
TTT_DECAY = 0.8  # weight of unrolled step j: 0.8 ** j
REFERENCE_DRAFT_VOCAB = 32000
SMALL_VOCAB = 4096  # at most this many target ids: draft vocabulary = half of them
# MMSpec's taps (method/eagle3/spec_model.py): hidden_states[0..2] = the input embeddings and
# the outputs of decoder layers 0 and 1
MMSPEC_TAPS: tuple[Feature, ...] = (EMBEDS, 0, 1)


def default_draft_vocab(vocab_size: int) -> int:
    if vocab_size <= SMALL_VOCAB:
        return vocab_size // 2
    return min(vocab_size, REFERENCE_DRAFT_VOCAB)


def image_slot_token(target: Target) -> int:
    """The token whose embedding the head reads at image slots: MMSpec's
    `tokenizer.pad_token_id or 0`."""
    return int(target.tokenizer.pad_token_id or 0)


def _target_image_slot_token(name: str) -> int:
    """`image_slot_token` of the target `name` (registry name, path or hub id), read from its
    tokenizer. Only for heads built from a bare DraftConfig (see `draft_config`)."""
    from transformers import AutoTokenizer

    from mmspec.models.loader import resolve_model_source

    if not name:
        raise ValueError(
            "an EAGLE-3 head needs config.extra['image_slot_token'] or the target's name; "
            "build its config with Eagle3Head.draft_config(method, target)"
        )
    source, local = resolve_model_source(name)
    return int(AutoTokenizer.from_pretrained(source, local_files_only=local).pad_token_id or 0)


def parse_feature(name: Any) -> Feature:
    """A `feature_layers` entry from config.json: "embeds", "final" or a layer index."""
    if name in (EMBEDS, FINAL) or (isinstance(name, int) and not isinstance(name, bool)):
        return name
    raise ValueError(f"EAGLE-3 feature {name!r}: use {EMBEDS!r}, {FINAL!r} or a layer index")


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
        hidden = hidden + attend(self.self_attn, x, position_embeddings, mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Head(ImageSlotHead):
    """fc-fused target features -> `midlayer` -> norm -> draft-vocabulary `lm_head`.

    State-dict keys are the reference's (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`,
    `t2d`) minus its frozen copy of the target's embedding table.
    """

    def __init__(self, config: DraftConfig) -> None:
        extra = config.extra  # resolved in place, so the saved config.json records them
        vocab = config.vocab_size
        if "feature_layers" not in extra:  # a new head: MMSpec's rule
            extra["feature_layers"] = list(MMSPEC_TAPS)
            extra.setdefault("zero_image_positions", True)
        # a head from before the image rule reads its taps as they are
        extra.setdefault("zero_image_positions", False)
        if extra["zero_image_positions"] and "image_slot_token" not in extra:
            extra["image_slot_token"] = _target_image_slot_token(config.target)
        extra["draft_vocab_size"] = min(
            vocab, int(extra.get("draft_vocab_size") or default_draft_vocab(vocab))
        )
        extra.setdefault("ttt_steps", TTT_STEPS)
        super().__init__(config)  # the image rule (methods/head_image_slots.py)
        self.config = config
        self.target_features = tuple(parse_feature(i) for i in extra["feature_layers"])
        if len(self.target_features) != 3:
            raise ValueError(f"EAGLE-3 fuses three features, got {self.target_features}")
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
        """The head's DraftConfig for `target`: MMSpec's taps and image rule unless `extra`
        names others, the image-slot token read off the target's tokenizer."""
        extra.setdefault("feature_layers", list(MMSPEC_TAPS))
        extra.setdefault("zero_image_positions", True)
        if extra["zero_image_positions"]:
            extra.setdefault("image_slot_token", image_slot_token(target))
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
        return self.combine(self.token_embeddings(embeds, image), hidden, None), positions, None

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
        cache = SlotCache()  # every step's keys, appended step by step
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

        `embed` (the target's) gives `image_slot_token`'s embedding; tokens come embedded in
        batch.features[EMBEDS]. `lm_head` is unused: the head has its own. `noise` is ignored:
        EAGLE-3 trains without feature noise.
        """
        if not self.vocab_ready:
            self.set_draft_vocab(token_counts(batch))
        steps = int(self.config.extra["ttt_steps"])
        feats = self.prepare_features(batch.features, batch.image)
        self.bind_embeddings(embed)
        fused = self.fuse(feats)
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
        cols = column(1, m + steps - 1)[0]
        embeds = self.token_embeddings(at(feats[EMBEDS], cols), torch.gather(batch.image, 1, cols))
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
        """A reference EAGLE-3 checkpoint (LLaMA-style config.json with draft_vocab_size).

        Read with MMSpec's rule (its published heads, `OFFICIAL_HEADS`, run on
        hidden_states[0..2] with image rows zeroed, whatever the checkpoint), unless the config
        names its layers as SpecForge / vLLM heads do (`eagle_aux_hidden_state_layer_ids`,
        indices of layer *inputs*; no image rule). Keys are normalised as MMSpec loads them.
        """
        from mmspec.methods.draft_checkpoint import CheckpointError, reference_config

        named = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        rule: dict[str, Any] = {
            "feature_layers": list(MMSPEC_TAPS),
            "zero_image_positions": True,
            "image_slot_token": image_slot_token(target),
        }
        if named:
            if len(named) != 3 or min(int(i) for i in named) < 1:
                raise CheckpointError(f"{where}: unusable eagle_aux_hidden_state_layer_ids {named}")
            rule = {"feature_layers": [int(i) - 1 for i in named], "zero_image_positions": False}
        state = _reference_keys(state)
        vocab = raw.get("vocab_size")
        extra = {
            **rule,
            "draft_vocab_size": int(raw.get("draft_vocab_size") or vocab or 0),
            "qkv_bias": "midlayer.self_attn.q_proj.bias" in state,
        }
        config = reference_config("eagle3", raw, target, where, **extra)
        draft = extra["draft_vocab_size"]
        if draft == config.vocab_size and "d2t" not in state and "t2d" not in state:
            # a full-vocabulary head may leave its (identity) map out
            state["d2t"] = torch.zeros(draft, dtype=torch.long)
            state["t2d"] = torch.ones(draft, dtype=torch.bool)
        return config, state


def _reference_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference state dict under our keys, as MMSpec's loader reads one: `module.` and
    `model.` prefixes dropped, `layers.0.` is `midlayer.`; without the frozen embedding copy
    (`embed_tokens.weight`, or a bare `weight` in some checkpoints)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("model.")
        if key.startswith("layers.0."):
            key = "midlayer." + key.removeprefix("layers.0.")
        if key not in ("embed_tokens.weight", "weight"):
            out[key] = value
    return out


def _vocab_loaded(module: nn.Module, incompatible: Any) -> None:
    # loaded d2t / t2d are a chosen vocabulary: training on must not re-pick it
    module.vocab_ready = True


@register("eagle3")
class Eagle3(DynamicTreeDrafter):
    head_cls = Eagle3Head
