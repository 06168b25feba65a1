"""Conversation encoding for training: chat messages, token kinds and padded batches.

Each training conversation is templated and processed exactly as the target adapter encodes a
prompt; every answer token is marked with its kind (template, grounded in the picture, the
continuation of a grounded fact, end of turn), which weights the loss and drives the
attention analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mmspec.models.target import PromptBatch, QwenVLTarget, Target
from mmspec.workloads.synthetic import Scene

Message = dict[str, Any]

# Where each family's assistant turn starts in the templated text (the answer follows).
ASSISTANT_HEADER = {"qwen2.5-vl": "<|im_start|>assistant\n", "llava": " ASSISTANT:"}


def training_messages(
    turns: Sequence[str], answers: Sequence[str], image: bool = True
) -> list[Message]:
    """Chat messages: the image with the first user turn, each answer after its turn.

    With one answer fewer than turns the chat ends on the next user turn (a prompt), exactly as
    the runner's `conversation()` builds it at inference.
    """
    if len(answers) not in (len(turns), len(turns) - 1):
        raise ValueError(f"{len(turns)} turns need {len(turns)} or {len(turns) - 1} answers")
    messages: list[Message] = []
    for t, text in enumerate(turns):
        content: list[dict[str, str]] = [{"type": "image"}] if t == 0 and image else []
        content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
        if t < len(answers):
            reply = [{"type": "text", "text": answers[t]}]
            messages.append({"role": "assistant", "content": reply})
    return messages


def assistant_mask(ids: list[int], header: list[int], end_ids: frozenset[int]) -> list[bool]:
    """True for the tokens of every assistant answer, its end-of-turn token included."""
    mask = [False] * len(ids)
    inside = False
    n = len(header)
    for i, tok in enumerate(ids):
        if inside:
            mask[i] = True
            inside = tok not in end_ids
        elif i >= n - 1 and ids[i - n + 1 : i + 1] == header:
            inside = True
    return mask


# What each token of an encoded conversation is, for the loss and for the attention analysis.
NO_LOSS = 0  # prompt, image and padding tokens
TEMPLATE = 1  # answer token that no fact from the picture is in
GROUNDED = 2  # first token of a fact read off the picture (and every digit of a value)
CONTINUATION = 3  # later pieces of a multi-token fact: they follow from its first token
END = 4  # the end-of-turn token after an answer


@dataclass
class Example:
    """One encoded training conversation (unpadded)."""

    input_ids: list[int]
    kinds: list[int]  # per token: NO_LOSS, TEMPLATE, GROUNDED, CONTINUATION or END
    extras: dict[str, torch.Tensor]  # image tensors of the processor, batch dim 1


def answer_token_spans(target: Target, answer: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span in `answer` of each of its tokens `ids` (as tokenised in context)."""
    # a LLaVA answer follows "ASSISTANT:", so token-wise it starts with a space
    lead = " " if target.family == "llava" else ""
    enc = target.tokenizer(lead + answer, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != ids:
        raise ValueError(f"answer {answer!r} tokenises differently in context")
    return [(max(0, s - len(lead)), e - len(lead)) for s, e in enc["offset_mapping"]]


def token_kind(span: tuple[int, int], text: str, grounded: Sequence[tuple[int, int]]) -> int:
    """TEMPLATE, GROUNDED or CONTINUATION for an answer token covering `span`."""
    start, end = span
    for g_start, g_end in grounded:
        if start < g_end and g_start < end:
            # each digit of a value is read off the picture; a word's later pieces are not
            first = start <= g_start or text.strip()[:1].isdigit()
            return GROUNDED if first else CONTINUATION
    return TEMPLATE


class Encoder:
    """Turns scenes into model inputs exactly as the target adapter encodes a prompt."""

    def __init__(self, target: Target) -> None:
        self.target = target
        tok = target.tokenizer
        self.header = tok.encode(ASSISTANT_HEADER[target.family], add_special_tokens=False)
        self.end_ids = target.eos_token_ids

    def encode(self, scene: Scene, image: Image.Image | None) -> Example:
        """The whole conversation of `scene` about `image`, answers included (no image:
        the same conversation as text only)."""
        text = self.target.tokenizer.apply_chat_template(
            training_messages(scene.turns, scene.references, image is not None), tokenize=False
        )
        feats = _process(self.target, [text], [image] if image is not None else [])
        ids = feats["input_ids"][0].tolist()
        extras = {
            k: v
            for k, v in feats.items()
            if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask")
        }
        return Example(ids, self._kinds(ids, scene), extras)

    def _kinds(self, ids: list[int], scene: Scene) -> list[int]:
        mask = assistant_mask(ids, self.header, self.end_ids)
        kinds = [NO_LOSS] * len(ids)
        runs: list[list[int]] = []  # positions of each answer's text tokens
        for p, (tok, on) in enumerate(zip(ids, mask, strict=True)):
            if not on:
                continue
            if tok in self.end_ids:
                kinds[p] = END
            elif runs and runs[-1][-1] == p - 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        for run in runs:
            for p in run:
                kinds[p] = TEMPLATE
        if len(runs) != len(scene.references):  # an empty answer: no grounding marks
            return kinds
        tokenizer = self.target.tokenizer
        for run, answer, grounded in zip(runs, scene.references, scene.grounded, strict=True):
            run_ids = [ids[p] for p in run]
            try:
                spans = answer_token_spans(self.target, answer, run_ids)
            except ValueError:
                continue
            for p, span, tok in zip(run, spans, run_ids, strict=True):
                kinds[p] = token_kind(span, tokenizer.decode([tok]), grounded)
        return kinds

    def collate(self, examples: list[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Left-padded batch inputs (with position ids) and the token kinds (batch, width)."""
        width = max(len(e.input_ids) for e in examples)
        pad = self.target.pad_token_id
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attn = torch.zeros((len(examples), width), dtype=torch.long)
        kinds = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            ids[row, width - n :] = torch.tensor(e.input_ids)
            attn[row, width - n :] = 1
            kinds[row, width - n :] = torch.tensor(e.kinds)
        inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": attn}
        for key in examples[0].extras:
            parts = [e.extras[key] for e in examples]
            if key == "mm_token_type_ids":  # per token: pad like the ids
                inputs[key] = torch.stack(
                    [torch.nn.functional.pad(p[0], (width - p.shape[1], 0)) for p in parts]
                )
            else:  # image tensors: concatenated in row order, as the processor batches them
                inputs[key] = torch.cat(parts)
        position_ids, _ = self.target.prefill_positions(PromptBatch(inputs, ids, attn))
        inputs["position_ids"] = position_ids
        return self.target.place(inputs), kinds.to(self.target.device)


def _process(target: Target, texts: list[str], images: list[Image.Image]) -> Any:
    if isinstance(target, QwenVLTarget):
        return target.processor(texts, images)
    return target.processor(text=texts, images=images or None, return_tensors="pt")
