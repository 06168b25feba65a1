"""The CPU's grouped-query SDPA (models/attention.py) computes what transformers' SDPA does."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mmspec.models.attention import GQA_SDPA, sdpa_attention
from mmspec.models.loader import load_target


class _Attn(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("q", [1, 4, 31, 300])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_gqa_sdpa_equals_transformers_sdpa(q: int, mask_kind: str) -> None:
    torch.manual_seed(q)
    b, heads, kv_heads, d, past = 2, 8, 2, 16, 97
    query = torch.randn(b, heads, q, d)
    key, value = torch.randn(2, b, kv_heads, past + q, d)
    mask = None
    if mask_kind != "none":  # causal over the new slots, row 1 left padded by 5
        visible = torch.ones(b, 1, q, past + q, dtype=torch.bool).tril(past)
        visible[1, :, :, :5] = False
        mask = visible
        if mask_kind == "float":
            mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    module = _Attn(heads // kv_heads)
    got, _ = sdpa_attention(module, query, key, value, mask, scaling=d**-0.5)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=d**-0.5)
    assert torch.equal(got, want)


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_targets_decode_as_with_transformers_sdpa(model: str) -> None:
    """A target's text layers run `sdpa_attention`; a prefill of two padded rows and a tree
    verification give the same logits as with transformers' SDPA on every layer."""
    ours = load_target(model)
    layers = ours.text_layers()
    assert all(layer.self_attn.config._attn_implementation == GQA_SDPA for layer in layers)
    theirs = copy.deepcopy(ours)
    for layer in theirs.text_layers():
        layer.self_attn.config._attn_implementation = "sdpa"
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    long = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Say it all " * 9}],
        }
    ]
    images = [Image.new("RGB", (90, 60), (200, 10, 10)), Image.new("RGB", (60, 90), (10, 10, 200))]
    prompt = ours.encode([conv, long], images)
    outs = []
    for target in (ours, theirs):
        cache = DynamicCache(config=target.model.config)
        first, next_pos = target.prefill(prompt, cache)
        bias = torch.zeros(prompt.attention_mask.shape).masked_fill(
            ~prompt.attention_mask.bool(), torch.finfo(torch.float32).min
        )
        tree = torch.zeros(3, 3).masked_fill(
            ~torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool),
            torch.finfo(torch.float32).min,
        )
        mask = torch.cat([bias[:, None, :].expand(-1, 3, -1), tree.expand(2, -1, -1)], dim=-1)
        ids = torch.stack([first.argmax(-1), torch.tensor([5, 6]), torch.tensor([7, 8])], dim=1)
        positions = next_pos[:, None] + torch.tensor([[0, 1, 1]])
        outs.append((first, target.verify(ids, positions, mask[:, None], cache)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
