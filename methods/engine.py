"""The one speculative-decoding loop every method runs through.

    prefill -> loop { drafter.propose -> target.verify (one forward over all trees)
                      -> accept -> commit (cache keeps only accepted slots) -> drafter.update }

Batches are ragged: each row accepts its own number of tokens and leaves the batch when it
emits EOS or reaches max_new_tokens. The KV cache is append-only with a per-row validity
mask of real slots; after each verification only the accepted path's slots are appended
(left-aligned per row, masked padding where rows accepted fewer), so rejected drafts never
take cache space, and slots masked as padding are squeezed out when they pile up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from mmspec.methods.accept import Acceptance, accept_greedy, accept_sampling
from mmspec.methods.base import DraftContext, Drafter, StepOutcome
from mmspec.methods.kv_slots import additive_mask, gather_slots, select_rows, squeeze_order
from mmspec.methods.tree import DraftTree
from mmspec.models.feature_taps import Feature, FeatureTap
from mmspec.models.target import Message, Target
from mmspec.models.vision_probe import VisionProbe


@dataclass
class Generation:
    """What one row of a batch produced, with its share of the batch's timings."""

    tokens: list[int] = field(default_factory=list)  # generated ids (EOS included if emitted)
    prompt_tokens: int = 0
    steps: int = 0  # verification forwards this row took part in
    skipped_steps: int = 0  # steps a wrapper chose not to draft (e.g. ViSkip)
    drafted: int = 0
    accepted: int = 0  # accepted draft tokens, bonus excluded
    accept_lengths: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    commit_s: float = 0.0
    total_s: float = 0.0  # batch start -> this row finished
    stop: str = ""  # "eos" | "length"


@dataclass
class _Live:
    """Decoding state of the rows still generating (indexed 0..active-1)."""

    cache: DynamicCache
    valid: torch.Tensor  # (active, cache_len) bool: slot holds a real token of this row
    vision: torch.Tensor  # (active, cache_len) bool: slot holds an image token
    next_pos: torch.Tensor  # (active,) text position of the pending token
    pending: torch.Tensor  # (active,) token to feed next: the root of the draft tree
    rows: list[int]  # (active,) batch row of each live row
    tokens: list[list[int]]  # (active,) prompt + generated ids, ending with the pending token
    prompt_lens: list[int]
    # (active,) attention mass on image tokens of the position that predicted the pending
    # token; only when the drafter asked for it
    score: torch.Tensor | None = None
    # the prompt's drafter features, until `begin` has them; each (active, P, width)
    features: dict[Feature, torch.Tensor] | None = None


class Engine:
    """Runs generation for one target and one drafter.

    Example:
        engine = Engine(load_target("tiny-qwen2.5-vl"), get_drafter("pld")())
        results = engine.generate(conversations, images, max_new_tokens=64)
    """

    def __init__(self, target: Target, drafter: Drafter, compact_slack: int = 64) -> None:
        self.target = target
        self.drafter = drafter
        # masked slots tolerated before the cache is squeezed (gather costs a full copy)
        self.compact_slack = compact_slack
        self._sync: Callable[[], None] = (
            torch.cuda.synchronize if target.device.type == "cuda" else (lambda: None)
        )
        self.probe = (
            VisionProbe(target.text_layers(), drafter.score_layers)
            if drafter.needs_vision_score
            else None
        )
        drafter.load(target)
        self.tap = FeatureTap(target, drafter.features) if drafter.features else None

    def generate(
        self,
        conversations: list[list[Message]],
        images: list[Image.Image | None],
        max_new_tokens: int,
        temperature: float = 0.0,
        seeds: list[int] | None = None,
    ) -> list[Generation]:
        """Generate one answer per conversation (a batch); lossless w.r.t. the target."""
        n = len(conversations)
        results = [Generation() for _ in range(n)]
        gens = [torch.Generator().manual_seed(s) for s in (seeds or [0] * n)]
        self._sync()
        start = time.perf_counter()
        prompt = self.target.encode(conversations, images)
        cache = DynamicCache(config=self.target.model.config)
        valid = prompt.attention_mask.bool()
        vision = (prompt.input_ids == self.target.image_token_id) & valid
        if self.probe:
            self.probe.arm(vision, last_only=True)
        if self.tap:
            self.tap.arm()
        logits, next_pos = self.target.prefill(prompt, cache)
        score = self.probe.take()[:, 0] if self.probe else None
        features = self.tap.take() if self.tap else None
        first = self._first_tokens(logits, temperature, gens)
        self._sync()
        prefill_s = time.perf_counter() - start
        live = _Live(
            cache=cache,
            valid=valid,
            vision=vision,
            next_pos=next_pos,
            pending=torch.tensor(first, device=self.target.device),
            rows=list(range(n)),
            tokens=[[*t, f] for t, f in zip(prompt.tokens(), first)],
            prompt_lens=prompt.prompt_lens,
            score=score,
            features=features,
        )
        for i, r in enumerate(results):
            r.prompt_tokens, r.prefill_s, r.tokens = live.prompt_lens[i], prefill_s, [first[i]]
        done = [self._finished(r, max_new_tokens) for r in results]
        self._drop(live, done, results, start)
        if live.rows:
            ctx = self._context(live, temperature)
            if live.features is not None:
                ctx.extras["features"] = live.features
            self.drafter.begin(ctx)
        live.features = None
        while live.rows:
            done = self._step(live, results, max_new_tokens, temperature, gens)
            self._drop(live, done, results, start)
        return results

    # ---- one step ------------------------------------------------------------------------
    def _step(
        self,
        live: _Live,
        results: list[Generation],
        max_new_tokens: int,
        temperature: float,
        gens: list[torch.Generator],
    ) -> list[bool]:
        ctx = self._context(live, temperature)
        t0 = time.perf_counter()
        trees = self.drafter.propose(ctx)
        self._sync()
        t1 = time.perf_counter()
        input_ids, positions, mask = self._tree_inputs(live, trees)
        if self.probe:
            new = torch.zeros_like(input_ids, dtype=torch.bool)
            self.probe.arm(torch.cat([live.vision, new], dim=1), last_only=False)
        if self.tap:
            self.tap.arm()
        logits = self.target.verify(input_ids, positions, mask, live.cache)
        features = self.tap.take() if self.tap else None
        self._sync()
        t2 = time.perf_counter()
        if temperature == 0.0:
            argmax = logits.argmax(dim=-1).tolist()
            accs = [accept_greedy(t, a) for t, a in zip(trees, argmax)]
        else:
            accs = [
                accept_sampling(t, logits[i, : len(t) + 1], temperature, gens[live.rows[i]])
                for i, t in enumerate(trees)
            ]
        if self.probe:  # the node that predicted the bonus token: the last accepted one
            mass = self.probe.take()
            last = torch.tensor([a.path[-1] + 1 if a.path else 0 for a in accs], device=mass.device)
            live.score = mass.gather(1, last[:, None])[:, 0]
        outcome = StepOutcome(
            trees, [a.path for a in accs], [a.tokens for a in accs], logits, features
        )
        self.drafter.update(ctx, outcome)
        self._commit(live, accs, cache_len=mask.shape[-1] - input_ids.shape[1])
        self._sync()
        t3 = time.perf_counter()
        done = []
        for i, (tree, acc) in enumerate(zip(trees, accs)):
            r = results[live.rows[i]]
            r.steps += 1
            r.skipped_steps += tree.skipped
            r.drafted += len(tree)
            r.accepted += len(acc.path)
            r.accept_lengths.append(len(acc.path))
            r.draft_s += t1 - t0
            r.verify_s += t2 - t1
            r.commit_s += t3 - t2
            r.tokens.extend(acc.tokens)
            done.append(self._finished(r, max_new_tokens))
        return done

    def _tree_inputs(
        self, live: _Live, trees: list[DraftTree]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input ids (b, q), text positions (b, q) and the additive mask (b, 1, q, kv + q)."""
        b, dev = len(trees), self.target.device
        q = 1 + max(len(t) for t in trees)
        # built in numpy and moved once: many tiny torch ops cost more than the tree itself
        pending = live.pending.tolist()
        ids = np.repeat(np.array(pending, dtype=np.int64)[:, None], q, axis=1)  # pad = root
        depth = np.zeros((b, q), dtype=np.int64)
        # padding nodes see only themselves (a row with no visible key would give NaNs)
        tree_mask = np.repeat(np.eye(q, dtype=bool)[None], b, axis=0)
        for i, t in enumerate(trees):
            n = len(t)
            if n == 0:
                continue
            ids[i, 1 : n + 1] = t.tokens
            depth[i, 1 : n + 1] = t.depths
            tree_mask[i, 1 : n + 1, 0] = True  # every node sees the root
            for j, p in enumerate(t.parents):
                if p >= 0:  # ancestors of the parent are ancestors of the child
                    tree_mask[i, j + 1] |= tree_mask[i, p + 1]
        tree_visible = torch.from_numpy(tree_mask).to(dev)
        visible = torch.cat([live.valid[:, None, :].expand(-1, q, -1), tree_visible], dim=-1)
        positions = live.next_pos[:, None] + torch.from_numpy(depth).to(dev)
        return torch.from_numpy(ids).to(dev), positions, additive_mask(visible, self.target.dtype)

    def _commit(self, live: _Live, accs: list[Acceptance], cache_len: int) -> None:
        """Keep the root and accepted nodes' slots; advance positions and pending tokens."""
        dev = self.target.device
        keep = max(len(a.path) for a in accs) + 1
        index = torch.zeros(len(accs), keep, dtype=torch.long)
        kept = torch.zeros(len(accs), keep, dtype=torch.bool)
        for i, a in enumerate(accs):
            slots = [0] + [n + 1 for n in a.path]  # q-indices: root, then accepted nodes
            index[i, : len(slots)] = torch.tensor(slots)
            kept[i, : len(slots)] = True
        # Chains (and AR) accept a prefix of the new slots: a slice keeps them without a copy.
        prefix = all(a.path == list(range(len(a.path))) for a in accs)
        index, kept = index.to(dev), kept.to(dev)
        for layer in live.cache.layers:
            for name in ("keys", "values"):
                full = getattr(layer, name)  # (b, heads, cache_len + q, head_dim)
                if prefix:
                    setattr(layer, name, full[:, :, : cache_len + keep])
                    continue
                gather = index[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3])
                new = torch.gather(full[:, :, cache_len:], 2, gather)
                setattr(layer, name, torch.cat([full[:, :, :cache_len], new], dim=2))
        live.valid = torch.cat([live.valid, kept], dim=1)
        live.vision = torch.cat([live.vision, torch.zeros_like(kept)], dim=1)
        live.next_pos = live.next_pos + kept.sum(dim=1)
        live.pending = torch.tensor([a.tokens[-1] for a in accs], device=dev)
        for toks, a in zip(live.tokens, accs):
            toks.extend(a.tokens)
        self._maybe_compact(live)

    def _maybe_compact(self, live: _Live) -> None:
        """Squeeze masked slots out of the cache once they cost more than `compact_slack`."""
        order = squeeze_order(live.valid, self.compact_slack)
        if order is None:
            return
        gather_slots(live.cache, order)
        live.valid = torch.gather(live.valid, 1, order)
        live.vision = torch.gather(live.vision, 1, order)

    # ---- helpers -------------------------------------------------------------------------
    def _first_tokens(
        self, logits: torch.Tensor, temperature: float, gens: list[torch.Generator]
    ) -> list[int]:
        if temperature == 0.0:
            return logits.argmax(dim=-1).tolist()
        probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
        return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, gens)]

    def _finished(self, r: Generation, max_new_tokens: int) -> bool:
        """Truncate at the first EOS or at max_new_tokens; say whether the row is done."""
        for i, tok in enumerate(r.tokens[:max_new_tokens]):
            if tok in self.target.eos_token_ids:
                del r.tokens[i + 1 :]
                r.stop = "eos"
                return True
        if len(r.tokens) >= max_new_tokens:
            del r.tokens[max_new_tokens:]
            r.stop = "length"
            return True
        return False

    def _drop(self, live: _Live, done: list[bool], results: list[Generation], start: float) -> None:
        """Remove finished rows from the batch so later steps cost nothing for them."""
        if not any(done):
            return
        now = time.perf_counter()
        for i, d in enumerate(done):
            if d:
                results[live.rows[i]].total_s = now - start
        keep = [i for i, d in enumerate(done) if not d]
        idx = torch.tensor(keep, dtype=torch.long, device=self.target.device)
        if keep:
            select_rows(live.cache, idx)
        live.valid = live.valid.index_select(0, idx)
        live.vision = live.vision.index_select(0, idx)
        if live.score is not None:
            live.score = live.score.index_select(0, idx)
        if live.features is not None:
            live.features = {k: v.index_select(0, idx) for k, v in live.features.items()}
        live.next_pos = live.next_pos.index_select(0, idx)
        live.pending = live.pending.index_select(0, idx)
        live.rows = [live.rows[i] for i in keep]
        live.tokens = [live.tokens[i] for i in keep]
        live.prompt_lens = [live.prompt_lens[i] for i in keep]

    def _context(self, live: _Live, temperature: float) -> DraftContext:
        return DraftContext(
            rows=live.rows,
            tokens=live.tokens,
            prompt_lens=live.prompt_lens,
            temperature=temperature,
            extras={} if live.score is None else {"vision_score": live.score.tolist()},
        )
