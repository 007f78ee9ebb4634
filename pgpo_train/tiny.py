"""The embedded default: a tiny random Qwen2.5-VL, its tokenizer and processor, and the count-copy visual task
(the default task, grid-count, and the task registry are in pgpo_train.tasks).

Everything here is built locally (no downloads) so `pgpo-train` with no arguments runs anywhere, and tests exercise
the real-run path (`from_pretrained` on a saved checkpoint, `load_dataset` on a saved local dataset).

The count-copy task: a 56x56 image holds a 2x2 grid of cells, each empty or holding a red, green or blue shape. The
question asks how many shapes of one colour there are. The answer needs the image: without it the model can only
guess from the prior. The reference response counts every colour inside <think> and boxes the asked one, so the
visually grounded tokens (the counts in the think) and the text-grounded ones (the boxed copy) are both present.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from dataclasses import field

from PIL import Image
from PIL import ImageDraw

logger = logging.getLogger(__name__)

# %% constants

IMAGE_SIZE = 56  # pixels; 56x56 -> 4x4 patches of 14 -> 2x2 = 4 image tokens after the 2x2 merge
GRID = 2  # cells per side: one merged image token per cell
MAX_IMAGE_SIZE = 84  # the grid-count task's images (pgpo_train.tasks)
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220)}
SHAPES = ("square", "circle", "triangle")
EMPTY = "none"

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
TINY_PROMPT_TEMPLATE = "{question} Think in <think></think>, answer in \\boxed{{}}."


# %% synthetic task


def count_question(color: str) -> str:
    return f"How many {color} shapes?"


def count_response(cells: list[str], answer: int) -> str:
    """The reference (SFT) response: the count of every colour (fixed order), then the boxed count asked for.

    our choice: per-colour counts rather than a cell-by-cell list; counting is an average over the image tokens,
    which a tiny transformer learns in minutes, while a reading-order list needs positional lookup.
    """
    counts = " ".join(f"{c} {sum(x == c for x in cells)}" for c in COLORS)
    return f"<think>{counts}</think>\\boxed{{{answer}}}"


def draw_cells(cells: list[str], rng: random.Random) -> Image.Image:
    """Draws one shape per non-empty cell, jittered a little so images differ pixel-wise.

    Args:
        cells: [GRID * GRID] colour names or EMPTY, in reading order.
        rng: source of shape kind and jitter.
    """
    return draw_shapes([None if c == EMPTY else c for c in cells], GRID, IMAGE_SIZE, rng, max_pad=6)


def draw_shapes(cells: list[str | None], side: int, size: int, rng: random.Random, max_pad: int) -> Image.Image:
    """A size x size image of a side x side grid: one shape of random kind per non-None cell (reading order), its
    box inset by a random pad in [3, max_pad] and jittered by +-2 px. Shared by the embedded tasks' generators."""
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    cell = size // side
    for i, color in enumerate(cells):
        if color is None:
            continue
        x0, y0 = (i % side) * cell, (i // side) * cell
        pad = rng.randint(3, max_pad)
        box = (x0 + pad + rng.randint(-2, 2), y0 + pad + rng.randint(-2, 2), x0 + cell - pad, y0 + cell - pad)
        kind = rng.choice(SHAPES)
        if kind == "square":
            draw.rectangle(box, fill=COLORS[color])
        elif kind == "circle":
            draw.ellipse(box, fill=COLORS[color])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLORS[color])
    return img


def make_count_example(rng: random.Random) -> dict:
    """One record: {"image": PIL, "problem": str, "answer": str, "solution": str (reference response)}."""
    cells = [rng.choice([EMPTY, *COLORS]) for _ in range(GRID * GRID)]
    color = rng.choice(list(COLORS))
    answer = sum(c == color for c in cells)
    return {
        "image": draw_cells(cells, rng),
        "problem": count_question(color),
        "answer": str(answer),
        "solution": count_response(cells, answer),
    }


def make_count_records(n: int, seed: int = 0) -> list[dict]:
    """[n] records of the count task, deterministic in seed."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(seed)
    return [make_count_example(rng) for _ in range(n)]


def save_count_dataset(path: str | os.PathLike, n_train: int = 2048, n_test: int = 256, seed: int = 0) -> str:
    """Writes the count task as parquet splits under path, loadable by `datasets.load_dataset(path)`.

    Returns:
        path, as a string.
    """
    return save_records_dataset(path, make_count_records, n_train, n_test, seed)


def save_records_dataset(path: str | os.PathLike, make_records, n_train: int, n_test: int, seed: int) -> str:
    """Writes make_records(n, seed) as train/test parquet splits (image, problem, answer, solution) under path, the
    test split from its own seed; returns path. Shared by every embedded task."""
    import datasets

    os.makedirs(path, exist_ok=True)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "solution": datasets.Value("string"),
        }
    )
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1_000_003)):
        ds = datasets.Dataset.from_list(make_records(n, s), features=features)
        ds.to_parquet(os.path.join(path, f"{split}.parquet"))
    return str(path)


# %% tokenizer and processor


def tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: every word the task, its template and the chat format use."""
    words = [*COLORS, EMPTY, "How many shapes?", "user", "assistant", "system", "Think in", "answer in", "\\boxed{}"]
    lines = [" ".join(words)]
    rng = random.Random(0)
    for _ in range(200):
        ex = make_count_example(rng)
        lines.append(TINY_PROMPT_TEMPLATE.format(question=ex["problem"]) + " " + ex["solution"])
    from pgpo_train.tasks import GRID_QUESTION  # lazy: tasks imports this module
    from pgpo_train.tasks import grid_response

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


def _image_only_processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor without a video processor.

        transformers' video processors need torchvision, which does not import beside the pinned CPU torch; images
        only need the PIL image processor. Everything else (token expansion, mm_token_type_ids) is Qwen's code.
        """

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2_5_VLProcessor


def build_image_processor(min_pixels: int = IMAGE_SIZE * IMAGE_SIZE, max_pixels: int = MAX_IMAGE_SIZE**2):
    """Qwen2-VL's PIL image processor (no torchvision needed); by default the tiny tasks' 56x56 and 84x84 images
    pass unresized (both are multiples of 28)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def make_processor(tokenizer, image_processor):
    """A Qwen2.5-VL processor from its parts, video processor left out (see ImageOnlyQwen2_5_VLProcessor)."""
    cls = _image_only_processor_class()
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def build_processor(vocab_size: int = 384):
    return make_processor(build_tokenizer(vocab_size), build_image_processor())


def load_processor(path: str):
    """`AutoProcessor.from_pretrained(path)`, falling back to tokenizer + PIL image processor without video.

    The fallback covers machines without torchvision (AutoProcessor then fails on the video processor) and our tiny
    checkpoints, which save only the tokenizer and the image processor.
    """
    from transformers import AutoImageProcessor
    from transformers import AutoProcessor
    from transformers import AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 -- any failure here means: build it from its parts
        logger.info("AutoProcessor.from_pretrained(%s) failed (%s); building the processor from its parts", path, e)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    except Exception:  # noqa: BLE001 -- older transformers: no backend kwarg
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer at {path} has no chat_template; a Qwen2.5-VL chat template is required")
    tokenizer.padding_side = "left"
    return make_processor(tokenizer, image_processor)


# %% model


@dataclass
class TinyConfig:
    """Size of the embedded tiny Qwen2.5-VL (random init). Defaults train in minutes on 2 CPU cores."""

    vocab_size: int = 384  # BPE target size incl. specials; the model's vocab is the tokenizer's actual length
    hidden_size: int = 64  # text hidden size (= vision out_hidden_size)
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4  # head_dim 16 -> mrope_section sums to 8
    num_key_value_heads: int = 2
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])
    vision_depth: int = 2
    vision_hidden_size: int = 48
    vision_intermediate_size: int = 96
    vision_num_heads: int = 2


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
