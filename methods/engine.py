"""The one speculative-decoding loop every method runs through.

    prefill -> loop { drafter.propose -> target.verify (one forward over all trees)
                      -> accept -> commit (cache keeps only accepted slots) -> drafter.update }

Batches are ragged: each row accepts its own number of tokens and leaves the batch when it
emits EOS or reaches its answer cap. The KV cache is append-only with a per-row validity
mask of real slots; after each verification only the accepted path's slots are kept
(left-aligned per row, masked padding where rows accepted fewer), so rejected drafts never
take cache space, and slots masked as padding are squeezed out when they pile up. Appends
are written in place (`kv_slots.SlotCache`), not by re-concatenating the cache.

Rows may also join a running batch (`serve`, continuous batching): a group of arrived
requests is prefilled on its own, then merged into the running cache (the shorter side left
padded with masked slots: positions are explicit per row, so where a slot sits does not matter)
and handed to the drafter's `join`; the others keep decoding after that one prefill. Their
encoding (processor work on the CPU) runs on a frontend thread while the others decode.

Per-step cost outside the forward matters on small targets (a tiny target's forward is
~1.5 ms on CPU, and each small tensor op between forwards costs ~5-15 us), so a step builds
its inputs with as few device ops as it can: per-row scalars are Python lists moved in one
copy, the validity mask is kept in additive form, and a step with nothing drafted (AR) takes
a short branch of the same loop.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import InitVar, dataclass, field
from functools import lru_cache
from itertools import islice
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache

from mmspec.methods.accept import Acceptance, accept_greedy, accept_sampling
from mmspec.methods.base import DraftContext, Drafter, StepOutcome
from mmspec.methods.kv_slots import (
    SlotCache,
    additive,
    additive_mask,
    gather_new_slots,
    gather_slots,
    join_rows,
    keep_rows,
    mask_values,
    pad_left,
    pad_right,
    squeeze_order,
    swap_remove,
)
from mmspec.methods.tree import DraftTree
from mmspec.models.feature_taps import Feature, FeatureTap
from mmspec.models.target import ContextLengthError, Message, PromptBatch, Target
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
    total_s: float = 0.0  # arrival (a static batch: its start) -> this row finished
    stop: str = ""  # "eos" | "length"
    # latency as the request saw it (seconds): arrival after the batch or stream started,
    # waiting before its prefill began, arrival -> first token, and per token in `tokens`
    # arrival -> emitted (tokens accepted by one verification share a time)
    arrival_s: float = 0.0
    queue_s: float = 0.0
    ttft_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)


@dataclass
class Request:
    """One generation request of a serving stream."""

    id: int  # unique in the stream; the drafter's row id (DraftContext.rows)
    messages: list[Message]
    image: Image.Image | None
    arrival_s: float  # seconds after the stream started; it joins no earlier
    seed: int = 0  # its sampling seed
    # its own answer cap (an API request's `max_tokens`); None: the stream's max_new_tokens
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(
                f"request {self.id}: max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )


class RequestSource(Protocol):
    """Where `Engine.serve` takes requests from and hands results to."""

    def arrivals(self, now_s: float) -> list[Request]:
        """Requests arrived by `now_s` and not returned before, in arrival order."""
        ...

    def next_arrival_s(self) -> float | None:
        """Arrival time of the next request not yet returned; None when none is known now."""
        ...

    def finished(
        self, request: Request, result: Generation | None, error: str | None, now_s: float
    ) -> None:
        """A request ended (`result`) or failed (`error`); may queue follow-ups (a
        conversation's next turn) arriving at `now_s`."""
        ...


@dataclass
class _Live:
    """Decoding state of the rows still generating (indexed 0..active-1), built after prefill.

    Per-row scalars live in Python lists, not tensors: each step moves them to the device in
    one copy, where tensors cost a few small ops per step to update.
    """

    cache: DynamicCache
    valid: InitVar[torch.Tensor]  # (active, prompt_len) bool: real prompt tokens (-> bias)
    # (active, cache_len) bool: slot holds an image token; None unless the probe reads it
    vision: torch.Tensor | None
    next_pos: list[int]  # (active,) text position of the pending token (a tensor is converted)
    pending: list[int]  # (active,) token to feed next: the root of the draft tree (ditto)
    rows: list[int]  # (active,) batch row of each live row
    tokens: list[list[int]]  # (active,) prompt + generated ids, ending with the pending token
    prompt_lens: list[int]
    # (active,) attention mass on image tokens of the position that predicted the pending
    # token; only when the drafter asked for it
    score: torch.Tensor | None = None
    # the prompt's drafter features, until `begin` has them; each (active, P, width)
    features: dict[Feature, torch.Tensor] | None = None
    # (active,) real slots per row: decides compaction without a device read
    real: list[int] = field(default_factory=list)
    # (active,) perf_counter time each row arrived: its latencies count from it (default now)
    origin: list[float] = field(default_factory=list)
    # (active,) each row's answer cap in tokens
    limit: list[int] = field(default_factory=list)
    # (active, cache_len) the additive mask row all of a row's queries start from: 0 where the
    # slot holds a real token of this row, the dtype's lowest where it holds padding or a
    # rejected draft. Kept additive, in the keys' dtype: a bool mask would cost a conversion
    # per step, and the step's own mask usually holds the next bias already (`_commit`).
    bias: torch.Tensor = field(init=False)

    def __post_init__(self, valid: torch.Tensor) -> None:
        self.bias = additive(valid, self.cache.layers[0].keys.dtype)  # the keys it masks
        if isinstance(self.next_pos, torch.Tensor):
            self.next_pos = self.next_pos.tolist()
        if isinstance(self.pending, torch.Tensor):
            self.pending = self.pending.tolist()
        if not self.real:
            self.real = valid.sum(dim=1).tolist()
        if not self.origin:
            self.origin = [time.perf_counter()] * len(self.rows)


class _Frontend:
    """Encodes requests on a worker thread while the engine decodes others: a serving
    frontend's job (vLLM runs it in its own process). A request not begun there is encoded
    in line when taken."""

    def __init__(self, target: Target, twin: Target, max_new_tokens: int) -> None:
        self._target, self._twin = target, twin  # in line; on the worker (its own tokenizer)
        self._max_new_tokens = max_new_tokens
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mmspec-encode")
        self._jobs: dict[int, Future[tuple[PromptBatch, float]]] = {}

    def ready(self, head: list[Request]) -> int:
        """Start encoding each request of `head` not begun yet; how many of them, from the
        first on, are encoded (first come, first served: a later one waits for an earlier)."""
        for r in head:
            if r.id not in self._jobs:
                self._jobs[r.id] = self._pool.submit(self._encode, self._twin, r)
        return next((i for i, r in enumerate(head) if not self._jobs[r.id].done()), len(head))

    def take(self, request: Request) -> tuple[PromptBatch, float]:
        """Its prompt: the worker's (waiting for it if need be), else encoded here. Raises
        what encoding raised."""
        job = self._jobs.pop(request.id, None)
        return job.result() if job is not None else self._encode(self._target, request)

    def _encode(self, target: Target, request: Request) -> tuple[PromptBatch, float]:
        """One request's prompt, and the perf_counter time its encoding began."""
        began = time.perf_counter()
        prompt = target.encode(
            [request.messages], [request.image], _cap(request, self._max_new_tokens)
        )
        return prompt, began

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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
        # each prefill starts from a copy: building a cache from the config reads the
        # config's layer types anew, ~0.07 ms, a twentieth of a join's own cost
        self._empty_cache = SlotCache(config=target.model.config)
        self._twin: Target | None = None  # the serving frontend's encoder (`serve`)
        # grows with every forward pass (prefill, each step): read from another thread as a
        # sign of life by the orchestrator's watchdog; an int bump costs nothing per step
        self.heartbeat = 0

    # The whole loop runs in inference mode: the engine's own small tensor ops cost less there
    # (no autograd bookkeeping), and the target's forwards need not enter it each step.
    @torch.inference_mode()
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
        results = {i: Generation() for i in range(n)}
        gens = {i: torch.Generator().manual_seed(s) for i, s in enumerate(seeds or [0] * n)}
        self._sync()
        start = time.perf_counter()
        prompt = self.target.encode(conversations, images, max_new_tokens)
        live = self._prefill(
            list(range(n)),
            prompt,
            [start] * n,
            [start] * n,
            [max_new_tokens] * n,
            results,
            temperature,
            gens,
        )
        if live.rows:
            self.drafter.begin(self._context(live, temperature, features=True))
        live.features = None
        while live.rows:
            done = self._step(live, results, temperature, gens)
            self.heartbeat += 1
            self._drop(live, done, results)
        return [results[i] for i in range(n)]

    @torch.inference_mode()
    def serve(
        self,
        source: RequestSource,
        max_batch: int,
        max_new_tokens: int,
        temperature: float = 0.0,
    ) -> float:
        """Continuous batching over a request stream; returns the stream's wall seconds.
        `max_new_tokens` caps each answer, except a request's own cap where it has one.

        Whenever fewer than `max_batch` rows decode, requests that have arrived join (first
        come, first served): they are prefilled together and merged into the running batch,
        and the drafter `join`s them (`begin` when the batch was empty). Each finished request
        goes to `source.finished` at once, so a follow-up turn can arrive. Idle, it sleeps
        until the next arrival. Lossless like `generate`: a row's tokens do not depend on who
        else is in the batch (greedy), or on its own seed only (sampling).

        A request's encoding (chat template, tokenizer, image processor: CPU work, several ms
        a request) runs beside the decoding rows, as a serving frontend does it: while rows
        decode, each request that a free slot awaits is encoded on a worker thread, and it
        joins at the first step boundary after its encoding is done; the running rows do not
        wait for it. With nothing decoding there is nothing to overlap, so it is encoded in
        line. At most one request per free slot is encoded ahead (pixels of a backlog stay
        unmade).
        """
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if self._twin is None:  # before the clock: copying a real tokenizer takes a while
            self._twin = self.target.encoding_twin()
        self._sync()
        start = time.perf_counter()
        waiting: deque[Request] = deque()
        requests: dict[int, Request] = {}
        results: dict[int, Generation] = {}
        gens: dict[int, torch.Generator] = {}
        live: _Live | None = None
        frontend = _Frontend(self.target, self._twin, max_new_tokens)

        def hand_out(ids: list[int]) -> None:
            now = time.perf_counter() - start
            for rid in ids:
                gens.pop(rid, None)
                source.finished(requests.pop(rid), results.pop(rid), None, now)

        try:
            while True:
                waiting.extend(source.arrivals(time.perf_counter() - start))
                free = max_batch - (len(live.rows) if live else 0)
                if waiting and free > 0:
                    # with rows decoding, requests join once the frontend has encoded them;
                    # with none, there is nothing to overlap: they are encoded in line
                    head = list(islice(waiting, free))
                    ready = frontend.ready(head) if live is not None else len(head)
                    if ready:
                        group = [waiting.popleft() for _ in range(ready)]
                        for r in group:
                            requests[r.id] = r
                            gens[r.id] = torch.Generator().manual_seed(r.seed)
                        joined = self._admit(
                            group,
                            frontend,
                            source,
                            start,
                            results,
                            max_new_tokens,
                            temperature,
                            gens,
                        )
                        running = set(joined.rows) if joined else set()
                        hand_out([r.id for r in group if r.id in results and r.id not in running])
                        if joined and joined.rows:
                            live = self._join(live, joined, temperature)
                        continue  # more may have arrived during the prefill
                if live is None:
                    nxt = source.next_arrival_s()
                    if nxt is None:
                        break
                    # waiting is progress: short sleeps keep the watchdog's heartbeat moving
                    time.sleep(min(1.0, max(0.0, nxt - (time.perf_counter() - start))))
                    self.heartbeat += 1
                    continue
                before = list(live.rows)
                done = self._step(live, results, temperature, gens)
                self.heartbeat += 1
                self._drop(live, done, results)
                hand_out([r for r, d in zip(before, done) if d])
                if not live.rows:
                    live = None
        finally:
            frontend.close()
        return time.perf_counter() - start

    def _admit(
        self,
        group: list[Request],
        frontend: _Frontend,
        source: RequestSource,
        start: float,
        results: dict[int, Generation],
        max_new_tokens: int,
        temperature: float,
        gens: Mapping[int, torch.Generator],
    ) -> _Live | None:
        """Prefill a group of arrived requests (encoded by the frontend, or here); a request
        whose prompt does not fit the context fails (handed to `source`) and the rest go on.
        None when none is left."""
        prompts, began, admitted = [], [], []
        for r in group:
            try:
                prompt, t = frontend.take(r)
            except ContextLengthError as exc:  # it never gets a result: hand_out skips it
                source.finished(
                    r, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start
                )
                continue
            results[r.id] = Generation(
                arrival_s=r.arrival_s, queue_s=max(0.0, t - start - r.arrival_s)
            )
            prompts.append(prompt)
            began.append(t)
            admitted.append(r)
        if not admitted:
            return None
        return self._prefill(
            [r.id for r in admitted],
            self.target.collate(prompts),
            [start + r.arrival_s for r in admitted],
            began,
            [_cap(r, max_new_tokens) for r in admitted],
            results,
            temperature,
            gens,
        )

    def _prefill(
        self,
        rows: list[int],
        prompt: PromptBatch,
        origins: list[float],
        began: list[float],
        limits: list[int],
        results: MutableMapping[int, Generation],
        temperature: float,
        gens: Mapping[int, torch.Generator],
    ) -> _Live:
        """Prefill encoded rows into a new batch state; records their first token (prefill_s:
        from `began`, when each row's encoding began). `limits`: each row's answer cap. Rows
        already finished after it (EOS first, or a cap of 1) are dropped."""
        cache = copy.deepcopy(self._empty_cache)
        valid = prompt.attention_mask.bool()
        vision = None
        if self.probe:
            vision = (prompt.input_ids == self.target.image_token_id) & valid
            self.probe.arm(vision, last_only=True)
        if self.tap:
            self.tap.arm()
        logits, next_pos = self.target.prefill(prompt, cache)
        self.heartbeat += 1
        score = self.probe.take()[:, 0] if self.probe else None
        features = self.tap.take() if self.tap else None
        first = self._first_tokens(logits, temperature, [gens[r] for r in rows])
        self._sync()
        now = time.perf_counter()
        prompt_lens = prompt.prompt_lens
        live = _Live(
            cache=cache,
            valid=valid,
            vision=vision,
            next_pos=next_pos,
            pending=list(first),
            rows=list(rows),
            tokens=[[*t, f] for t, f in zip(prompt.tokens(), first)],
            prompt_lens=prompt_lens,
            origin=list(origins),
            limit=list(limits),
            score=score,
            features=features,
            real=list(prompt_lens),
        )
        done = []
        for row, token, n, origin, t, cap in zip(rows, first, prompt_lens, origins, began, limits):
            r = results[row]
            r.prompt_tokens, r.prefill_s, r.tokens = n, now - t, [token]
            r.ttft_s = now - origin
            r.token_times_s = [r.ttft_s]
            done.append(self._finished(r, cap, 1))
        self._drop(live, done, results)
        return live

    def _join(self, live: _Live | None, new: _Live, temperature: float) -> _Live:
        """Start a batch with `new`'s rows, or append them to the running one; the drafter
        sets them up either way."""
        ctx = self._context(new, temperature, features=True)
        new.features = None
        if live is None:
            self.drafter.begin(ctx)
            return new
        self.drafter.join(ctx)
        return _merge(live, new)

    # ---- one step ------------------------------------------------------------------------
    def _step(
        self,
        live: _Live,
        results: Mapping[int, Generation],
        temperature: float,
        gens: Mapping[int, torch.Generator],
    ) -> list[bool]:
        ctx = self._context(live, temperature)
        t0 = time.perf_counter()
        trees = self.drafter.propose(ctx)
        self._sync()
        t1 = time.perf_counter()
        input_ids, positions, mask = self._tree_inputs(live, trees)
        q = input_ids.shape[1]
        if self.probe:  # the new slots are text
            self.probe.arm(F.pad(live.vision, (0, q)), last_only=False)
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
            live.score = self.probe.take(
                torch.tensor([a.path[-1] + 1 if a.path else 0 for a in accs])
            )
        outcome = StepOutcome(
            trees, [a.path for a in accs], [a.tokens for a in accs], logits, features
        )
        self.drafter.update(ctx, outcome)
        self._commit(live, accs, mask)
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
            r.token_times_s.extend([t3 - live.origin[i]] * len(acc.tokens))
            done.append(self._finished(r, live.limit[i], len(acc.tokens)))
        return done

    def _tree_inputs(
        self, live: _Live, trees: list[DraftTree]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input ids (b, q), text positions (b, q) and the additive mask (b, 1, q, kv + q)."""
        b, dev = len(trees), self.target.device
        q = 1 + max(len(t) for t in trees)
        # Lists, then one copy: a step of small numpy/torch ops costs more than the tree itself.
        # Padding nodes repeat the root at its position.
        ids, pos = [], []
        for t, root, start in zip(trees, live.pending, live.next_pos):
            pad = q - 1 - len(t)
            ids.append([root, *t.tokens, *[root] * pad])
            pos.append([start, *[start + d for d in t.depths], *[start] * pad])
        ids_t, pos_t = torch.tensor([ids, pos], device=dev)
        if q == 1:  # nothing drafted (AR, or every row skipped): the root sees cache and itself
            zero = mask_values(live.bias.dtype, dev)[0].expand(b, 1)
            return ids_t, pos_t, torch.cat([live.bias, zero], dim=1)[:, None, None]
        # padding nodes see only themselves (a row with no visible key would give NaNs)
        tree_mask = np.repeat(np.eye(q, dtype=bool)[None], b, axis=0)
        for i, t in enumerate(trees):
            if len(t):
                tree_mask[i, : len(t) + 1, : len(t) + 1] = _ancestors(tuple(t.parents))
        tree = additive_mask(torch.from_numpy(tree_mask).to(dev), live.bias.dtype)
        mask = torch.cat([live.bias[:, None, None, :].expand(-1, 1, q, -1), tree], dim=-1)
        return ids_t, pos_t, mask

    def _commit(self, live: _Live, accs: list[Acceptance], mask: torch.Tensor) -> None:
        """Keep the root and accepted nodes' slots; advance positions and pending tokens.

        `mask` is the step's (b, 1, q, cache_len + q) mask from `_tree_inputs`.
        """
        dev = self.target.device
        q = mask.shape[2]
        cache_len = mask.shape[3] - q
        lens = [len(a.path) + 1 for a in accs]  # kept slots per row: root + accepted nodes
        keep = max(lens)
        # A path of strictly increasing nodes ending at node k-1 is nodes 0..k-1: a prefix of
        # the new slots (chains and AR always are), which a slice keeps without a copy.
        prefix = all(not a.path or a.path[-1] == len(a.path) - 1 for a in accs)
        if not prefix:
            index = np.zeros((len(accs), keep), dtype=np.int64)
            for i, a in enumerate(accs):  # q-indices: root, then accepted nodes
                index[i, 1 : lens[i]] = a.path
                index[i, 1 : lens[i]] += 1
            gather_new_slots(live.cache, torch.from_numpy(index).to(dev), cache_len)
        elif keep < q:
            for layer in live.cache.layers:
                layer.keys = layer.keys[:, :, : cache_len + keep]
                layer.values = layer.values[:, :, : cache_len + keep]
        if prefix and min(lens) == keep:
            # The last accepted node's mask row is the old bias, then the root and its accepted
            # path visible: exactly the new bias, already on the device (AR: the root's row).
            live.bias = mask[:, 0, keep - 1, : cache_len + keep]
        else:
            kept = np.arange(keep)[None, :] < np.array(lens)[:, None]
            new = additive(torch.from_numpy(kept).to(dev), live.bias.dtype)
            live.bias = torch.cat([live.bias, new], dim=1)
        if live.vision is not None:
            live.vision = F.pad(live.vision, (0, keep))
        for i, (a, n) in enumerate(zip(accs, lens)):
            live.next_pos[i] += n
            live.real[i] += n
            live.pending[i] = a.tokens[-1]
            live.tokens[i].extend(a.tokens)
        self._maybe_compact(live)

    def _maybe_compact(self, live: _Live) -> None:
        """Squeeze masked slots out of the cache once they cost more than `compact_slack`."""
        if live.bias.shape[1] - max(live.real) <= self.compact_slack:
            return  # checked on the host: asking squeeze_order would read the device each step
        order = squeeze_order(live.bias == 0, self.compact_slack)
        if order is None:
            return
        gather_slots(live.cache, order)
        live.bias = torch.gather(live.bias, 1, order)
        if live.vision is not None:
            live.vision = torch.gather(live.vision, 1, order)

    # ---- helpers -------------------------------------------------------------------------
    def _first_tokens(
        self, logits: torch.Tensor, temperature: float, gens: list[torch.Generator]
    ) -> list[int]:
        if temperature == 0.0:
            return logits.argmax(dim=-1).tolist()
        probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
        return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, gens)]

    def _finished(self, r: Generation, max_new_tokens: int, new: int) -> bool:
        """Truncate at the first EOS or at `max_new_tokens` (the row's cap); say whether the
        row is done.

        Only the `new` last tokens are searched: earlier ones held no EOS, or the row would
        have finished then.
        """
        first = len(r.tokens) - new
        for i in range(first, min(len(r.tokens), max_new_tokens)):
            if r.tokens[i] in self.target.eos_token_ids:
                del r.tokens[i + 1 :], r.token_times_s[i + 1 :]
                r.stop = "eos"
                return True
        if len(r.tokens) >= max_new_tokens:
            del r.tokens[max_new_tokens:], r.token_times_s[max_new_tokens:]
            r.stop = "length"
            return True
        return False

    def _drop(self, live: _Live, done: list[bool], results: Mapping[int, Generation]) -> None:
        """Remove finished rows from the batch so later steps cost nothing for them."""
        if not any(done):
            return
        now = time.perf_counter()
        for i, d in enumerate(done):
            if d:
                results[live.rows[i]].total_s = now - live.origin[i]
        # the last rows move into the holes: the cache's rows are moved in place, one each
        # (drafters map their per-row state by row id: `kept_rows`)
        keep = swap_remove(done)
        live.rows = [live.rows[i] for i in keep]
        if not keep:  # the batch is over: nothing will read the rest
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.target.device)
        keep_rows(live.cache, keep)
        live.bias = live.bias.index_select(0, idx)
        if live.vision is not None:
            live.vision = live.vision.index_select(0, idx)
        if live.score is not None:
            live.score = live.score.index_select(0, idx)
        if live.features is not None:
            live.features = {k: v.index_select(0, idx) for k, v in live.features.items()}
        for name in ("next_pos", "pending", "real", "tokens", "prompt_lens", "origin", "limit"):
            values = getattr(live, name)
            setattr(live, name, [values[i] for i in keep])

    def _context(self, live: _Live, temperature: float, features: bool = False) -> DraftContext:
        """The drafter's view of the live rows; `features`: with the prompt's (begin, join)."""
        ctx = DraftContext(
            rows=live.rows,
            tokens=live.tokens,
            prompt_lens=live.prompt_lens,
            temperature=temperature,
            extras={} if live.score is None else {"vision_score": live.score.tolist()},
        )
        if features and live.features is not None:
            ctx.extras["features"] = live.features
        return ctx


def _merge(a: _Live, b: _Live) -> _Live:
    """`a`'s rows, then `b`'s, in one batch state. The narrower side gets masked slots: the
    joining rows in front of theirs, the running rows after theirs, so the running rows'
    cache stays where it is (`join_rows`). Each row's positions are its own, so a slot's
    index means nothing to it."""
    width = max(a.bias.shape[1], b.bias.shape[1])
    lowest = torch.finfo(a.bias.dtype).min
    a.cache = join_rows(a.cache, b.cache)
    a.bias = torch.cat([pad_right(a.bias, width, 1, lowest), pad_left(b.bias, width, 1, lowest)])
    if a.vision is not None and b.vision is not None:
        a.vision = torch.cat([pad_right(a.vision, width, 1), pad_left(b.vision, width, 1)])
    if a.score is not None and b.score is not None:
        a.score = torch.cat([a.score, b.score])
    for name in ("next_pos", "pending", "rows", "tokens", "prompt_lens", "origin", "real", "limit"):
        getattr(a, name).extend(getattr(b, name))
    return a


def _cap(request: Request, max_new_tokens: int) -> int:
    """A request's answer cap: its own, else the stream's."""
    return max_new_tokens if request.max_new_tokens is None else request.max_new_tokens


@lru_cache(maxsize=1024)
def _ancestors(parents: tuple[int, ...]) -> np.ndarray:
    """(n + 1, n + 1) bool: q-index i sees q-index j (the root, itself or an ancestor).

    Cached by shape: chains and static trees repeat every step. Callers copy, never write.
    """
    n = len(parents)
    seen = np.eye(n + 1, dtype=bool)
    seen[1:, 0] = True  # every node sees the root
    for j, p in enumerate(parents):
        if p >= 0:  # ancestors of the parent are ancestors of the child
            seen[j + 1] |= seen[p + 1]
    seen.flags.writeable = False
    return seen
