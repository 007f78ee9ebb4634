"""The embedded default model: a tiny random Qwen2.5-VL with its tokenizer and processor (the embedded tasks are in
pgpo_train.data.tasks; loading a real model's processor is pgpo_train.models.processor).

Everything here is built locally (no downloads) so `pgpo-train` with no arguments runs anywhere, and tests exercise
the real-run path (`from_pretrained` on a saved checkpoint, `load_dataset` on a saved local dataset).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from dataclasses import field

from pgpo_train.data.tasks import COLORS
from pgpo_train.data.tasks import EMPTY
from pgpo_train.data.tasks import GRID_QUESTION
from pgpo_train.data.tasks import IMAGE_SIZE
from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE
from pgpo_train.data.tasks import grid_response
from pgpo_train.data.tasks import make_count_example
from pgpo_train.models.processor import make_processor

# %% constants

MAX_IMAGE_SIZE = 84  # the grid-count task's images (pgpo_train.data.tasks)

# Qwen2.5-VL's special tokens, so the processor, chat template and model config work unchanged.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
THINK_TOKENS = ["<think>", "</think>"]  # ordinary (non-special) added tokens: decoded text keeps them
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# %% tokenizer and processor


def tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: every word the task, its template and the chat format use."""
    words = [*COLORS, EMPTY, "How many shapes?", "user", "assistant", "system", "Think in", "answer in", "\\boxed{}"]
    lines = [" ".join(words)]
    rng = random.Random(0)
    for _ in range(200):
        ex = make_count_example(rng)
        lines.append(TINY_PROMPT_TEMPLATE.format(question=ex["problem"]) + " " + ex["solution"])
    lines += [TINY_PROMPT_TEMPLATE.format(question=GRID_QUESTION) + " " + grid_response(n) for n in range(10)] * 20
    lines.append("0123456789 +-*/=()[]{}.,:;!?'\" the a is are of to and")
    return lines


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE with Qwen2.5-VL's special tokens, wrapped as a transformers fast tokenizer.

    Byte-level keeps decoding exact for any text (math-verify parses what the model writes); the BPE merges keep
    the task's sequences short. Deterministic: same corpus, same merges.
    """
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    tok.add_tokens(THINK_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_image_processor(min_pixels: int = IMAGE_SIZE * IMAGE_SIZE, max_pixels: int = MAX_IMAGE_SIZE**2):
    """Qwen2-VL's PIL image processor (no torchvision needed); by default the tiny tasks' 56x56 and 84x84 images
    pass unresized (both are multiples of 28)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def build_processor(vocab_size: int = 384):
    return make_processor(build_tokenizer(vocab_size), build_image_processor())


# %% model


@dataclass
class TinyConfig:
    """Size of the embedded tiny Qwen2.5-VL (random init). Defaults train in minutes on 2 CPU cores."""

    vocab_size: int = 384  # BPE target size incl. specials; the model's vocab is the tokenizer's actual length
    hidden_size: int = 64  # text hidden size (= vision out_hidden_size)
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4  # head_dim 16 -> mrope_section sums to 8 (tiny_config(32): vLLM's head size)
    num_key_value_heads: int = 2
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])
    vision_depth: int = 2
    vision_hidden_size: int = 48
    vision_intermediate_size: int = 96
    vision_num_heads: int = 2


# head size -> (query heads, KV heads, mrope_section), the same 299,664 parameters either way. 16 is the embedded
# default; vLLM's attention backends take 32 and up (its CPU backend refuses 16), so --rollout-engine vllm uses 32.
TINY_HEADS = {16: (4, 2, [2, 3, 3]), 32: (2, 1, [4, 6, 6])}


def tiny_config(head_dim: int = 16) -> TinyConfig:
    """TinyConfig with attention heads of head_dim (TINY_HEADS' sizes)."""
    if head_dim not in TINY_HEADS:
        raise ValueError(f"tiny head_dim must be one of {sorted(TINY_HEADS)}, got {head_dim}")
    heads, kv_heads, mrope = TINY_HEADS[head_dim]
    return TinyConfig(num_attention_heads=heads, num_key_value_heads=kv_heads, mrope_section=list(mrope))


def tiny_model_config(tokenizer, cfg: TinyConfig | None = None):
    """A Qwen2_5_VLConfig for the tiny model, with token ids taken from tokenizer."""
    from transformers import Qwen2_5_VLConfig

    cfg = cfg or TinyConfig()
    ids = tokenizer.convert_tokens_to_ids
    if 2 * sum(cfg.mrope_section) != cfg.hidden_size // cfg.num_attention_heads:
        raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim/2")
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": list(cfg.mrope_section),
                "rope_theta": 10000.0,
            },
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": cfg.vision_depth,
            "hidden_size": cfg.vision_hidden_size,
            "intermediate_size": cfg.vision_intermediate_size,
            "num_heads": cfg.vision_num_heads,
            "out_hidden_size": cfg.hidden_size,
            "fullatt_block_indexes": [cfg.vision_depth - 1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def build_tiny_model(tokenizer, cfg: TinyConfig | None = None, seed: int = 0):
    """A randomly initialized tiny Qwen2_5_VLForConditionalGeneration (fp32, eager-free sdpa attention)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_model_config(tokenizer, cfg)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model


def build_tiny(cfg: TinyConfig | None = None, seed: int = 0):
    """(model, processor) of the embedded default."""
    processor = build_processor((cfg or TinyConfig()).vocab_size)
    return build_tiny_model(processor.tokenizer, cfg, seed), processor


def save_tiny_checkpoint(
    path: str | os.PathLike, cfg: TinyConfig | None = None, seed: int = 0, model=None, processor=None
) -> str:
    """Saves a tiny model + tokenizer + image processor so that `from_pretrained(path)` and `load_processor(path)` work.

    Args:
        path: output directory (created).
        cfg, seed: used to build a fresh tiny model when model/processor are not given.
        model, processor: save these instead (e.g. after SFT).

    Returns:
        path, as a string.
    """
    if model is None or processor is None:
        model, processor = build_tiny(cfg, seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    return str(path)
