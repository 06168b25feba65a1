"""Compare the two sides' JSON: one Markdown table per model, one row per method.

    python benchmarks/parity/compare.py [--out DIR] [--models ...] [--methods ...]

Standard library only. "Step-equal" compares each prompt's accepted-draft counts step by
step after the end-of-run bookkeeping of both sides is normalised (`normalise`); see
README.md for why each rule is needed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import METHODS, MODELS, parity_home, read_result, result_path


@dataclass
class Run:
    """One generation after normalisation."""

    output: list[int]  # cut after the first stop token and at max_new_tokens
    steps: list[int]  # accepted drafts per verification step, bonus excluded
    clipped: int = 0  # last steps whose acceptance ran past the end of the output
    dropped: int = 0  # steps that started after the output was complete
    trailing: int = 0  # tokens emitted past a stop token or past the budget


def normalise(record: dict[str, Any], stops: set[int], max_new: int) -> Run:
    """Put both sides' bookkeeping on one footing.

    Output: the first `max_new` tokens, cut after the first stop token (MMSpec's PLD and
    EAGLE loops append a whole accepted run even when a stop token is inside it).

    Steps: before step i the tokens known are B_i = 1 + sum_{j<i} (a_j + 1) (the prefill's
    token, then each step's accepted drafts and its bonus). Step i adds min(a_i + 1, L - B_i)
    tokens to an output of length L; its count is that minus one, so a_i is clipped to
    L - B_i - 1: the output's last token counts as its step's bonus, whether a side cut the
    step there (MMSpec's EAGLE and Lookahead cap the last step to the budget, its Lookahead
    cuts it after a stop token) or recorded every draft the verification accepted (ours). A
    step with B_i >= L starts after the output is complete (MMSpec's EAGLE runs one more
    forward when the stop token arrives as a bonus) and is dropped. A side without steps
    (stock `generate`) gets L - 1 steps of 0.
    """
    raw = record["output_ids"]
    out = raw[:max_new]
    for i, tok in enumerate(out):
        if tok in stops:
            out = out[: i + 1]
            break
    run = Run(out, [], trailing=len(raw) - len(out))
    accept = record.get("accept_lengths")
    if accept is None:
        run.steps = [0] * max(len(out) - 1, 0)
        return run
    known = 1
    for a in accept:
        if known >= len(out):
            run.dropped += 1
            continue
        kept = min(a, len(out) - known - 1)
        run.clipped += kept != a
        run.steps.append(kept)
        known += a + 1
    return run


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _ratio(k: int, n: int) -> str:
    return f"{k}/{n}" if n else "n/a"


@dataclass
class Side:
    """One side's totals over the prompts of a method."""

    greedy: int = 0  # generations whose output is the greedy one
    greedy_of: int = 0  # generations on the prompt the greedy run had (the others: no truth)
    tokens: int = 0
    steps: int = 0
    wall: float = 0.0
    clipped: int = 0
    dropped: int = 0
    trailing: int = 0

    def add(self, run: Run, wall: float, greedy: list[int] | None) -> None:
        """`greedy`: the greedy output for this generation's prompt, None when unknown."""
        if greedy is not None:
            self.greedy_of += 1
            self.greedy += run.output == greedy
        self.tokens += len(run.output)
        self.steps += len(run.steps)
        self.wall += wall
        self.clipped += run.clipped
        self.dropped += run.dropped
        self.trailing += run.trailing

    @property
    def mat(self) -> float:
        return self.tokens / self.steps if self.steps else float("nan")

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall else float("nan")

    @property
    def bookkeeping(self) -> str:
        return f"{self.clipped}c {self.dropped}d {self.trailing}t"


def _key(record: dict[str, Any]) -> tuple[str, int]:
    return record["id"], record.get("turn", 0)


def _label(record: dict[str, Any]) -> str:
    return f"{record['id']}/{record.get('turn', 0)} ({record['topic']})"


def _truth(
    greedy: dict[tuple[str, int], tuple[list[int], list[int]]], record: dict[str, Any]
) -> list[int] | None:
    """The greedy output for `record`'s (sample, turn) if it answered the same prompt."""
    prompt, output = greedy.get(_key(record), (None, None))
    return output if prompt == record["prompt_ids"] else None


def compare(out: Path, model: str, methods: list[str]) -> tuple[list[str], list[str]]:
    """Table rows and notes (where prompts or steps differ) for one model.

    One comparison per (sample, turn). A later turn's prompt holds the earlier answers each
    side fed back, so it differs once an earlier answer differs (as text, after each side's
    decoding): its steps are still compared, on different prompts."""
    greedy = read_result(result_path(out, "reference", model, "ar"))
    rows, notes = [], []
    for name in methods:
        ref = read_result(result_path(out, "reference", model, name))
        ours = read_result(result_path(out, "ours", model, name))
        if ref is None or ours is None:
            rows.append(f"| {name} | missing: {'reference' if ref is None else 'ours'} |")
            continue
        stops, max_new = set(ours.get("stop_ids", [])), ours["max_new_tokens"]
        # the greedy output per (sample, turn), with the prompt it answered: a later turn's
        # prompt holds earlier answers, so a side that fed back another answer has no truth
        greedy_out = {
            _key(r): (r["prompt_ids"], normalise(r, stops, max_new).output)
            for r in (greedy or {}).get("records", [])
        }

        ours_by_key = {_key(r): r for r in ours["records"]}
        n = prompts_eq = steps_eq = later = later_eq = 0
        r_side, o_side = Side(), Side()
        for rr in ref["records"]:
            orr = ours_by_key.get(_key(rr))
            if orr is None:
                continue
            n += 1
            a, b = normalise(rr, stops, max_new), normalise(orr, stops, max_new)
            same_prompt = all(rr.get(k) == orr.get(k) for k in ("prompt_ids", "pixels_sha256"))
            prompts_eq += same_prompt
            if _key(rr)[1] > 0:
                later += 1
                later_eq += same_prompt
            steps_eq += a.steps == b.steps
            r_side.add(a, rr["wall_s"], _truth(greedy_out, rr))
            o_side.add(b, orr["wall_s"], _truth(greedy_out, orr))
            if not same_prompt:
                i = first_difference(rr["prompt_ids"], orr["prompt_ids"])
                where = "the image" if i is None else f"token {i}"
                notes.append(f"- {model} {name} {_label(rr)}: prompts differ from {where}")
            if a.steps != b.steps:
                i = first_difference(a.steps, b.steps)
                notes.append(
                    f"- {model} {name} {_label(rr)}: steps from step {i}: "
                    f"ref {a.steps[i : i + 6]} ours {b.steps[i : i + 6]} "
                    f"({len(a.steps)} vs {len(b.steps)} steps; outputs "
                    f"{'equal' if a.output == b.output else 'differ'})"
                )
        r_greedy, o_greedy = (
            _ratio(r_side.greedy, r_side.greedy_of),
            _ratio(o_side.greedy, o_side.greedy_of),
        )
        rows.append(
            f"| {name} | {_ratio(prompts_eq, n)} | {_ratio(later_eq, later)} "
            f"| {r_greedy} | {o_greedy} "
            f"| {_ratio(steps_eq, n)} | {r_side.bookkeeping} / {o_side.bookkeeping} "
            f"| {r_side.mat:.2f} | {o_side.mat:.2f} "
            f"| {r_side.tps:.0f} | {o_side.tps:.0f} | {o_side.tps / r_side.tps:.2f} |"
        )
    return rows, notes


HEADER = (
    "| method | prompts equal | of them turns 2+ | ref = greedy | ours = greedy | steps equal "
    "| bookkeeping ref / ours | MAT ref | MAT ours | tok/s ref | tok/s ours | ours/ref |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def report(out: Path, models: list[str], methods: list[str]) -> str:
    parts = []
    for model in models:
        rows, notes = compare(out, model, methods)
        parts.append(f"### {model}\n\n{HEADER}\n" + "\n".join(rows))
        if notes:
            parts.append(
                "Where prompts or steps differ (steps: the first differing step, then up to 6):\n\n"
                + "\n".join(notes)
            )
    parts.append(
        "Counts are over (sample, turn) generations. "
        "prompts equal = same prompt ids and same image tensor (sha256 of pixel_values); "
        "turns 2+ = the same over later turns only (their prompts hold each side's earlier "
        "answers). "
        "greedy = MMSpec's stock `generate` (ref ar), over the generations whose prompt is the "
        "one it answered (a later turn after a different answer has no greedy truth). "
        "bookkeeping: steps clipped (c) / dropped "
        "(d) by the normalisation, tokens past a stop token or the budget (t). MAT = output "
        "tokens / verification steps, after normalisation. tok/s = output tokens / best wall "
        "time, summed over prompts."
    )
    return "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=parity_home() / "out")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    print(report(args.out, args.models.split(","), args.methods.split(",")), end="")


if __name__ == "__main__":
    main()
