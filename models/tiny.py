"""The project's own tiny VLMs: real transformers classes with CPU-sized configs, trained.

Two layers:

* builders (`BUILDERS`) write the *untrained* initial checkpoint of each architecture
  deterministically: a byte-level BPE tokenizer trained offline with `tokenizers` on a
  built-in corpus (including the synthetic suite's training split), a config and weights from
  a fixed seed. `tiny_init_path` caches that build in `$MMSPEC_HOME`.
* the zoo (`models/zoo/<name>/`): the same checkpoints after training on the synthetic
  suite's training split (`python -m mmspec.training.train_tiny`), committed with the repo.
  `tiny_model_path` returns that directory; nothing is trained or built at load time.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from mmspec.models.zoo_paths import ZOO_DIR, cache_root
from mmspec.workloads.sample import TOPICS
from mmspec.workloads.synthetic import synthetic_scenes

log = logging.getLogger(__name__)

# Bump when a builder changes, so a stale cached init is never loaded.
TINY_VERSION = 5
SEED = 1234
VOCAB_SIZE = 1024
RETRAIN_COMMAND = "python -m mmspec.training.train_tiny --model all"

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

# Same structure as the real Qwen2.5-VL template (system prompt, image inside the user turn).
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-1.5 style: "USER: <image>\n... ASSISTANT: ...</s>". Text is trimmed because a decoded
# LLaVA answer starts with a space (" The ...") and the runner feeds answers back verbatim:
# trimming keeps later turns tokenised exactly as in training.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Qwen2's pre-tokenizer split: digits one by one, words with their leading space.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# prose is easier to extend than a list literal
_CORPUS_WORDS = """
the a an of and to in on at is are was what which where who how many much color colour shape
size left right top bottom middle center front behind above below next near between image
picture photo scene describe detail question answer chart bar line value values label axis sign
text word number red green blue yellow orange purple black white gray brown pink circle square
triangle rectangle star object objects there one two three four five six seven eight nine ten
zero highest lowest largest smallest more less than option options correct choose diagram shows
show showing please explain why because this that these those it its they them with without
from for by as be can could would should do does did not no yes small large big little tall
short open closed man woman person people dog cat car tree house table chair book cup sky water
grass road building window door street sign says read assistant user system you helpful
conversation follow up previous about also then first second third finally total sum difference
increase decrease year month trend compare
""".split()  # noqa: SIM905


def _corpus() -> list[str]:
    # Deterministic, offline training text: the words above, topic names and templated
    # sentences that look like the benchmark's prompts and answers.
    lines = [" ".join(_CORPUS_WORDS[i : i + 12]) for i in range(0, len(_CORPUS_WORDS), 12)]
    lines += list(TOPICS)
    n = len(_CORPUS_WORDS)
    for i, w in enumerate(_CORPUS_WORDS):
        lines.append(f"What is the {w} in the image? The {w} is {_CORPUS_WORDS[(i * 7) % n]}.")
        lines.append(f"There are {i % 10} {w}s next to the {_CORPUS_WORDS[(i * 13) % n]}.")
    lines += [f"{n} {n * 3} {n}.{n % 10}% A) B) C) D)" for n in range(100)]
    # the chat templates' own words, often enough to become single tokens
    lines += ["system\nYou are a helpful assistant.\nuser\nassistant\n"] * 200
    lines += ["USER: USER: question ASSISTANT: answer"] * 200
    # the synthetic suite's training split, so its answer words are single tokens
    for _, scene in synthetic_scenes(per_topic=300, seed=0, split="train"):
        lines += [*scene.turns, *scene.references]
    return lines


def build_tokenizer(
    specials: list[str], eos: str, pad: str, template: str
) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text (the real MMSpec prompts too) encodes without unknown tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, padding_side="left"
    )
    fast.chat_template = template
    return fast


def _init_weights(model: torch.nn.Module) -> None:
    # Explicit and seeded rather than the library's own init, so the starting point of
    # training does not move with a transformers release. Norm scales are found by module
    # type, not by name: Qwen's vision merger calls its norm `ln_q`, and a zero scale there
    # would cut the image off from the language model.
    norm_scales = {
        id(m.weight)
        for m in model.modules()
        if "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if id(p) in norm_scales:
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.zero_()


def build_tiny_qwen(out: Path) -> None:
    """Untrained tiny Qwen2.5-VL: 4 x 128 text layers, a 2-block ViT, 16 image tokens."""
    tok = build_tokenizer(QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>", QWEN_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {
        "vocab_size": len(tok),
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        # head_dim 32: 16 rotary pairs over (t, h, w), the slowest six for w. At the usual
        # theta 1e4 those turn 2e-4..3e-3 rad per column, so the language model cannot tell
        # left from right, and the 2-block ViT (relative RoPE only, no absolute position
        # embedding) has little to mark columns with on a plain background: questions about a
        # cell stayed near chance. Theta 3 turns w by 0.36..0.50 rad per column (text positions
        # keep a 1 rad/token fastest pair). Measured in benchmarks/RESULTS.md (tiny zoo).
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 3.0,
            "mrope_section": [4, 6, 6],
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 128,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    _init_weights(model)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    # 112x112 pixels at most: an 8x8 patch grid, 16 image tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    # Saved as tokenizer + image processor rather than a Qwen2_5_VLProcessor: that class cannot
    # be built without torchvision (its video half), and a real checkpoint has both files too.
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor.save_pretrained(out)


def build_tiny_llava(out: Path) -> None:
    """Untrained tiny LLaVA: 4 x 128 Llama layers, a 3-layer CLIP at 112 px, 16 image tokens."""
    tok = build_tokenizer(LLAVA_SPECIALS, "</s>", "<pad>", LLAVA_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}
    tok.bos_token, tok.unk_token = "<s>", "<unk>"
    # 112 px in 28 px patches: a 4x4 grid, the same 16 image tokens as the tiny Qwen.
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=112,
        patch_size=28,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    _init_weights(model)
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=28,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-qwen2.5-vl": build_tiny_qwen,
    "tiny-llava": build_tiny_llava,
}


def _check_name(name: str) -> None:
    if name not in BUILDERS:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(sorted(BUILDERS))}")


def tiny_init_path(name: str) -> Path:
    """The untrained initial checkpoint of `name`, built on first use (atomic, process-safe)."""
    _check_name(name)
    final = cache_root() / "models" / f"{name}-init-v{TINY_VERSION}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        log.info("building untrained tiny model %s in %s", name, final)
        BUILDERS[name](tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the node's workers
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first; its build is identical
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_model_path(name: str) -> Path:
    """The trained checkpoint of `name`, committed under models/zoo/; never trained here."""
    _check_name(name)
    path = ZOO_DIR / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"tiny model {name!r}: no trained checkpoint in {path}; retrain the zoo with "
            f"`{RETRAIN_COMMAND}`"
        )
    return path
