"""Target adapters: one unmodified transformers VLM behind prefill / tree-verify calls.

The engine never touches a model class directly. An adapter turns conversations into model
inputs, gives prefill positions, maps per-token text positions to the model's position
format (M-RoPE for Qwen2.5-VL, 1D for LLaVA) and runs forwards with an explicit 4D mask.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature

from mmspec.models.attention import use_gqa_sdpa
from mmspec.models.prompting import system_messages

Message = dict[str, Any]  # HF chat format: {"role": ..., "content": [{"type": "text", ...}]}


class ContextLengthError(ValueError):
    """Prompts that leave no room for `max_new_tokens` in the model's context."""

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows  # the batch rows that do not fit


@dataclass
class PromptBatch:
    """Encoded prompts of a batch, left padded."""

    inputs: dict[str, torch.Tensor]  # every tensor the model's forward takes for the prompt
    input_ids: torch.Tensor  # (batch, prompt_len)
    attention_mask: torch.Tensor  # (batch, prompt_len) 1 = real token

    @property
    def prompt_lens(self) -> list[int]:
        return self.attention_mask.sum(dim=1).tolist()

    def tokens(self) -> list[list[int]]:
        """Unpadded prompt ids per row."""
        return [ids[m.bool()].tolist() for ids, m in zip(self.input_ids, self.attention_mask)]


def cache_keyword(module: torch.nn.Module) -> str:
    """The name `module.forward` takes its KV cache by.

    transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns until
    5.40); older releases silently ignore an unknown `cache` kwarg, so ask forward.
    """
    params = inspect.signature(type(module).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def inference(fn: _Fn) -> _Fn:
    """Run `fn` under torch.inference_mode(), entering it only when it is not on already.

    The engine decodes in inference mode, and entering it again costs ~15 us a step: about
    1% of a tiny target's forward.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Target:
    """Base adapter. Subclasses set `family` and the two position hooks."""

    family: ClassVar[str] = ""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        tokenizer: Any,
        name: str = "",
        prompt_style: str = "chat_template",
    ) -> None:
        self.name = name  # the model id it was loaded as (drafters find their heads by it)
        self.prompt_style = prompt_style  # models/prompting.py: what goes before each chat
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(eos if isinstance(eos, list) else [eos])
        self.pad_token_id: int = tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = min(self.eos_token_ids)
        self._cache_kw = cache_keyword(model)
        # the language model inside the multimodal one (both families nest it the same way);
        # verification runs its parts itself (see `verify`)
        self.text_model: torch.nn.Module = model.model.language_model
        use_gqa_sdpa(self.text_model.layers)
        self._layers = tuple(self.text_model.layers[: self.text_model.config.num_hidden_layers])
        self._layer_cache_kw = cache_keyword(self._layers[0])
        self._lm_head = model.get_output_embeddings()
        # tokens the model can hold, prompt and answer together; None when its config is silent
        self.context_length: int | None = getattr(
            model.config.get_text_config(), "max_position_embeddings", None
        )

    # ---- prompts -------------------------------------------------------------------------
    def encode(
        self,
        conversations: list[list[Message]],
        images: list[Image.Image | None],
        max_new_tokens: int | None = None,
    ) -> PromptBatch:
        """Chat-template and tokenise a batch; `images[i]` goes with conversation i's first turn.

        Given `max_new_tokens`, raise ContextLengthError for prompts it does not fit beside.
        """
        system = system_messages(self.prompt_style)
        texts = [
            self.tokenizer.apply_chat_template(
                [*system, *c], add_generation_prompt=True, tokenize=False
            )
            for c in conversations
        ]
        present = [im for im in images if im is not None]
        feats = self._process(texts, present)
        inputs = self.place(feats)
        prompt = PromptBatch(inputs, inputs["input_ids"], inputs["attention_mask"])
        if max_new_tokens is not None:
            self.check_context(prompt, max_new_tokens)
        return prompt

    def encoding_twin(self) -> Target:
        """This target with a tokenizer and processor of its own (the model shared), to encode
        on another thread: a fast tokenizer used by two threads at once can fail ("Already
        borrowed"), and the engine's thread decodes answers and reads special ids meanwhile."""
        twin = copy.copy(self)
        twin.processor, twin.tokenizer = copy.deepcopy((self.processor, self.tokenizer))
        return twin

    def collate(self, prompts: list[PromptBatch]) -> PromptBatch:
        """One left-padded batch from prompts encoded apart (a serving stream encodes each
        request as it arrives, then prefills those admitted together); the same tensors as
        encoding them together (tests/test_engine.py).

        Tensors laid out like `input_ids` (batch, prompt_len) are padded on the left - ids
        with the pad id, masks and token-type ids with 0 -, the rest (pixels, image grids)
        concatenated along their first axis as the processor stacks them.
        """
        if len(prompts) == 1:
            return prompts[0]
        width = max(p.input_ids.shape[1] for p in prompts)
        inputs: dict[str, torch.Tensor] = {}
        for key in dict.fromkeys(k for p in prompts for k in p.inputs):  # text-only lack pixels
            with_key = [p for p in prompts if key in p.inputs]
            if with_key[0].inputs[key].shape == with_key[0].input_ids.shape:
                # one entry per prompt token: every prompt has one, padded like the ids
                fill = self.pad_token_id if key == "input_ids" else 0
                parts = [
                    F.pad(p.inputs[key], (width - p.input_ids.shape[1], 0), value=fill)
                    for p in prompts
                ]
            else:
                parts = [p.inputs[key] for p in with_key]
            inputs[key] = torch.cat(parts)
        return PromptBatch(inputs, inputs["input_ids"], inputs["attention_mask"])

    def check_context(self, prompt: PromptBatch, max_new_tokens: int) -> None:
        """Fail a batch whose prompt plus `max_new_tokens` exceeds the model's context, before
        prefill: generation would run past the positions the model knows, and for a huge
        `max_new_tokens` (nearly) forever."""
        context = self.context_length
        # the padded width bounds every row: the common case reads nothing off the device
        if context is None or prompt.input_ids.shape[1] + max_new_tokens <= context:
            return
        lens = prompt.prompt_lens
        rows = [i for i, n in enumerate(lens) if n + max_new_tokens > context]
        if rows:
            raise ContextLengthError(
                f"prompt of {lens[rows[0]]} tokens (batch row {rows[0]}) + max_new_tokens "
                f"{max_new_tokens} exceeds model {self.name or '<unnamed>'}'s context of "
                f"{context} tokens",
                rows,
            )

    def place(self, feats: Any) -> dict[str, torch.Tensor]:
        """Processor outputs as model inputs: on the model's device, pixels in its dtype."""
        inputs = {k: v.to(self.device) for k, v in feats.items() if isinstance(v, torch.Tensor)}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _process(self, texts: list[str], images: list[Image.Image]) -> BatchFeature:
        return self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def text_layers(self) -> torch.nn.ModuleList:
        """The language model's decoder layers."""
        return self.text_model.layers

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- positions -----------------------------------------------------------------------
    def prefill_positions(self, prompt: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids for the prompt, and each row's next text position (batch,)."""
        raise NotImplementedError

    def text_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Model position ids for text tokens at `positions` (batch, q)."""
        raise NotImplementedError

    # ---- forwards ------------------------------------------------------------------------
    @inference
    def prefill(self, prompt: PromptBatch, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt; returns last-position logits (batch, vocab) and next positions."""
        position_ids, next_pos = self.prefill_positions(prompt)
        out = self.model(
            **prompt.inputs,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1, :], next_pos

    @inference
    def verify(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """One forward over tree tokens.

        Args:
            input_ids: (batch, q) root token then draft nodes (padded).
            positions: (batch, q) text position of each node.
            mask: (batch, 1, q, cache_len + q) additive float mask (0 = attend).
        Returns:
            logits (batch, q, vocab).
        """
        # What the model's forward does for text tokens under a ready 4D mask, its parts
        # called directly: the wrappers around them (multimodal model, language model: mask
        # building, output records) cost ~0.25 ms a forward in Python, 15% of a tiny
        # target's; the logits and cache are the same bits (tests/test_engine.py)
        lm = self.text_model
        hidden = lm.embed_tokens(input_ids)
        rope = lm.rotary_emb(hidden, self.text_positions(positions))
        layer_kw = {self._layer_cache_kw: cache}
        for layer in self._layers:
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=rope, use_cache=True, **layer_kw
            )
        return self._lm_head(lm.norm(hidden))


class QwenVLTarget(Target):
    """Qwen2.5-VL: multimodal RoPE with three axes; text tokens use one position on all three."""

    family = "qwen2.5-vl"

    def prefill_positions(self, prompt: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        mm_types = prompt.inputs.get("mm_token_type_ids")
        if mm_types is None:
            image_token = self.model.config.image_token_id
            mm_types = (prompt.input_ids == image_token).int()
        position_ids, _ = self.model.model.get_rope_index(
            prompt.input_ids,
            mm_types,
            image_grid_thw=prompt.inputs.get("image_grid_thw"),
            attention_mask=prompt.attention_mask,
        )
        next_pos = position_ids.amax(dim=(0, 2)) + 1
        return position_ids, next_pos

    def text_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.unsqueeze(0).expand(3, -1, -1)

    def _process(self, texts: list[str], images: list[Image.Image]) -> BatchFeature:
        if not isinstance(self.processor, QwenPromptProcessor):
            return super()._process(texts, images)
        return self.processor(texts, images)


class LlavaTarget(Target):
    """LLaVA: plain 1D positions; image features replace the expanded <image> tokens."""

    family = "llava"

    def prefill_positions(self, prompt: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = prompt.attention_mask.long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return position_ids, mask.sum(-1)

    def text_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions


class QwenPromptProcessor:
    """Tokenizer + image processor doing what Qwen2_5_VLProcessor does for images.

    Qwen2_5_VLProcessor cannot be constructed without torchvision (its video processor), so
    the adapter composes the two parts every Qwen2.5-VL checkpoint ships: each
    <|image_pad|> is expanded to one token per merged patch, and mm_token_type_ids marks them.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)

    def __call__(self, texts: list[str], images: list[Image.Image]) -> BatchFeature:
        data: dict[str, Any] = {}
        if images:
            feats = self.image_processor(images=images, return_tensors="pt")
            data.update(feats)
            merge = self.image_processor.merge_size**2
            counts = iter((feats["image_grid_thw"].prod(-1) // merge).tolist())
            texts = [self._expand(t, counts) for t in texts]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        data.update(enc)
        data["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).int()
        return BatchFeature(data)

    def _expand(self, text: str, counts: Any) -> str:
        parts = text.split(self.image_token)
        out = parts[0]
        for part in parts[1:]:
            out += self.image_token * next(counts) + part
        return out


TARGETS: dict[str, type[Target]] = {t.family: t for t in (QwenVLTarget, LlavaTarget)}
