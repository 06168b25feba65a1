"""What a draft head reads at the prompt's image slots: one definition for drafting and training.

Two options of the head's config (`config.extra`), read by `ImageSlotHead`, the base of the
EAGLE heads (EAGLE-1/2, EAGLE-3). ViSpec's and MSD's heads inherit it through EAGLE's but read
image slots their own way (their `prompt_inputs`), so only `zero_image_positions` reaches them.

- `image_slot_token` (a token id): at every image slot the head reads the target's embedding
  of that token where it reads a token embedding; unset or null, what the target was fed
  there: the projected image features (the `EMBEDS` tap).
- `zero_image_positions` (bool, default false): the rows of image slots in every tapped target
  feature are set to 0 before the head fuses them.

Which values a new head takes is its method's business, MMSpec's rule by default: EAGLE-1/2
(methods/eagle.py) the `<image>` token's own embedding on LLaVA-1.5 and the image features on
Qwen2.5-VL, nothing zeroed; EAGLE-3 (methods/eagle3.py) the pad token and zeroed rows on both.
A head saved without the options reads the features as they were tapped, as it was trained.

Only the prompt's slots: a generated token that happens to be the image token is embedded as
text, and its features are kept (MMSpec's EAGLE-3 would zero them; it never came up).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmspec.methods.head_config import DraftConfig
from mmspec.models.feature_taps import Feature


def zero_image_rows(
    feats: dict[Feature, torch.Tensor], image: torch.Tensor
) -> dict[Feature, torch.Tensor]:
    """Every feature (b, L, width) with the rows of image positions `image` (b, L) set to 0."""
    rows = image[..., None]
    return {name: x.masked_fill(rows, 0.0) for name, x in feats.items()}


def prompt_image(
    tokens: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    width: int,
    image_token_id: int,
    device: torch.device,
) -> torch.Tensor:
    """(b, width) whether each position of a left-padded prompt batch is an image slot; row i
    holds the first prompt_lens[i] of tokens[i], right-aligned."""
    image = torch.zeros(len(tokens), width, dtype=torch.bool, device=device)
    for i, (row, n) in enumerate(zip(tokens, prompt_lens)):
        image[i, width - n :] = torch.tensor(row[:n], device=device) == image_token_id
    return image


class ImageSlotHead(nn.Module):
    """Base of the EAGLE heads: applies the two options of the module docstring.

    Training and drafting call the same three: `bind_embeddings` once the head sits beside the
    target (the slot token's embedding comes from the target's own table), `prepare_features`
    on the tapped features, `token_embeddings` where the head pairs token embeddings with them.
    """

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        extra = config.extra
        self.zero_image = bool(extra.get("zero_image_positions", False))
        token = extra.get("image_slot_token")
        self.slot_token: int | None = None if token is None else int(token)
        # (h,) the target's embedding of slot_token (`bind_embeddings`); not saved: the
        # target's table is the truth
        self.register_buffer("slot_embed", torch.zeros(config.hidden_size), persistent=False)

    def prepare_features(
        self, feats: dict[Feature, torch.Tensor], image: torch.Tensor
    ) -> dict[Feature, torch.Tensor]:
        """The tapped features (b, L, width) as the head reads them; `image` (b, L) marks the
        image slots, whose rows are 0 under `zero_image_positions`."""
        return zero_image_rows(feats, image) if self.zero_image else feats

    def token_embeddings(self, embeds: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The token embeddings (…, h) the head reads beside the features; `image` (…) marks
        image slots, which read `image_slot_token`'s embedding where one is set."""
        if self.slot_token is None:
            return embeds
        return torch.where(image[..., None], self.slot_embed.to(embeds.dtype), embeds)

    @torch.no_grad()
    def bind_embeddings(self, embed: nn.Module) -> None:
        """Take `image_slot_token`'s embedding from the target's table `embed`."""
        if self.slot_token is not None:
            token = torch.tensor(self.slot_token, device=embed.weight.device)
            self.slot_embed.copy_(embed(token))
