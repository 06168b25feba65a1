"""Target features for trained drafters, tapped from the unmodified model with forward hooks.

A drafter names what it reads (`Drafter.features`):

- `EMBEDS`: what the language model is fed - token embeddings, and at image slots the
  projected image features (the only place a drafter can see the picture): the model's
  `output_hidden_states[0]`;
- `FINAL`: the last hidden state after the final norm, what the LM head reads (EAGLE-1/2,
  Medusa, ViSpec, MSD);
- an int `i`: the output of decoder layer `i` (negative counts from the end), the model's
  `output_hidden_states[i + 1]` except for the last layer (there it is the un-normed one).
  EAGLE-3 fuses three features (MMSpec's: EMBEDS, 0 and 1).

The hooks cost nothing while disarmed; armed, they keep references to tensors the forward
computes anyway, so the target runs exactly as without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmspec.models.target import Target

Feature = int | str
EMBEDS = "embeds"
FINAL = "final"


def resolve_layer(target: Target, layer: int) -> int:
    """A decoder layer index in [0, num_layers), from a possibly negative one."""
    n = len(target.text_layers())
    if not -n <= layer < n:
        raise ValueError(f"feature layer {layer} out of range for a {n}-layer target")
    return layer % n


class FeatureTap:
    """Records the named features of the next forward(s) of `target`'s language model.

    Example:
        tap = FeatureTap(target, (FINAL,))
        tap.arm(); target.verify(...); feats = tap.take()   # {FINAL: (batch, q, hidden)}
    """

    def __init__(self, target: Target, names: Sequence[Feature]) -> None:
        if not names:
            raise ValueError("a feature tap needs at least one feature")
        self.names = tuple(dict.fromkeys(names))  # a name given twice is tapped once
        self.armed = False
        self._seen: dict[Feature, torch.Tensor] = {}
        lm = target.text_model
        self._handles = []
        for name in self.names:
            if name == EMBEDS:
                # token ids are embedded by `embed_tokens` (the multimodal wrapper's prefill
                # too, before it writes the image features in); what the language model is then
                # fed, when fed embeddings, replaces that (`Target.verify` calls the language
                # model's layers itself, so only the embedding's hook sees its steps)
                self._handles.append(lm.embed_tokens.register_forward_hook(self._hook(EMBEDS)))
                self._handles.append(
                    lm.register_forward_pre_hook(self._embeds_hook, with_kwargs=True)
                )
            elif name == FINAL:
                self._handles.append(lm.norm.register_forward_hook(self._hook(FINAL)))
            elif isinstance(name, int) and not isinstance(name, bool):
                layer = target.text_layers()[resolve_layer(target, name)]
                self._handles.append(layer.register_forward_hook(self._hook(name)))
            else:
                raise ValueError(
                    f"unknown target feature {name!r}: use {EMBEDS!r}, {FINAL!r} or a layer index"
                )

    def _hook(self, name: Feature) -> Any:
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self.armed:
                self._seen[name] = output[0] if isinstance(output, tuple) else output

        return record

    def _embeds_hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if self.armed and kwargs.get("inputs_embeds") is not None:
            self._seen[EMBEDS] = kwargs["inputs_embeds"]

    def arm(self) -> None:
        self.armed, self._seen = True, {}

    def take(self) -> dict[Feature, torch.Tensor]:
        """Each named feature of the recorded forward, (batch, seq, width); then disarm."""
        missing = [n for n in self.names if n not in self._seen]
        if missing:
            raise RuntimeError(f"the feature tap recorded nothing for {missing}: was it armed?")
        seen, self.armed, self._seen = self._seen, False, {}
        return {n: seen[n] for n in self.names}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
