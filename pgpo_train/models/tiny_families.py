"""Tiny random models, tokenizers and processors of every family in pgpo_train.models.model_family, built locally.

For tests and examples only: each family gets the tiny BPE of pgpo_train.models.tiny plus its own image tokens and chat
template, its real transformers processor class (video processors left out: they need torchvision, which does not
import beside the pinned CPU torch) and a random ~1M-parameter model. Nothing is downloaded.

    model, processor = build_tiny_family("gemma3")
"""

from __future__ import annotations

import torch

from pgpo_train.data.tasks import IMAGE_SIZE
from pgpo_train.models.tiny import SPECIAL_TOKENS
from pgpo_train.models.tiny import THINK_TOKENS
from pgpo_train.models.tiny import build_image_processor
from pgpo_train.models.tiny import tokenizer_corpus

HIDDEN, HEADS, KV_HEADS, LAYERS, INTER = 64, 4, 2, 2, 128
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}

ROW_COL_TOKENS = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]

# per family: the image token string of its chat template, and the extra special tokens it needs
FAMILY_TOKENS = {
    "qwen2_vl": [],
    "qwen2_5_vl": [],
    "qwen3_vl": [],
    "gemma3": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"],
    "llava_onevision": ["<image>", "<video>"],
    # the grid tags are single tokens in the real Idefics3 / SmolVLM tokenizers (their processors look them up)
    "idefics3": ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *ROW_COL_TOKENS],
    "smolvlm": ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *ROW_COL_TOKENS],
    "internvl": ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
}
IMAGE_IN_TEMPLATE = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
    "llava_onevision": "<image>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "internvl": "<IMG_CONTEXT>",
}
TINY_FAMILIES = tuple(FAMILY_TOKENS)


def _chat_template(image: str) -> str:
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def build_family_tokenizer(family: str, vocab_size: int = 384):
    """The tiny BPE with Qwen's specials, the family's image tokens and chat template (attributes the processors
    read, e.g. Gemma 3's `boi_token`, InternVL's `context_image_token`, are set as extra special tokens)."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    extra = FAMILY_TOKENS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + extra,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    tok.add_tokens(THINK_TOKENS)
    named = {
        "gemma3": {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"},
        "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
        "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                     "video_token": "<video>"},
    }.get(family, {})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:] + extra,
                                        extra_special_tokens=named)
    tokenizer.chat_template = _chat_template(IMAGE_IN_TEMPLATE[family])
    tokenizer.padding_side = "left"
    return tokenizer


def _without_video(cls):
    """The processor class, accepting a missing video processor (images only; see the module docstring)."""

    class ImageOnly(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{cls.__name__}"
    return ImageOnly


def _text_config(tok, **extra) -> dict:
    ids = tok.convert_tokens_to_ids
    return {"vocab_size": len(tok), "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 1024,
            "bos_token_id": None, "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>"), **extra}


def _qwen(family: str, tok):
    import transformers as tf

    ids = tok.convert_tokens_to_ids
    common = {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
              "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}
    if family == "qwen3_vl":
        config = tf.Qwen3VLConfig(
            text_config=_text_config(tok, head_dim=16, rope_parameters={
                "rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 10000.0}),
            vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                           "out_hidden_size": HIDDEN, "patch_size": 14, "spatial_merge_size": 2,
                           "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
            **common)
        model_cls, proc_cls = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor
    else:
        text = _text_config(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                  "rope_theta": 10000.0})
        if family == "qwen2_vl":
            vision = {"depth": 2, "embed_dim": 32, "hidden_size": HIDDEN, "num_heads": 2, "mlp_ratio": 2}
            config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **common)
            model_cls, proc_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
        else:
            vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                      "out_hidden_size": HIDDEN, "fullatt_block_indexes": [1]}
            config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
            model_cls, proc_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
    return config, model_cls, _without_video(proc_cls)(image_processor=build_image_processor(), tokenizer=tok,
                                                       chat_template=tok.chat_template)


def _gemma3(tok):
    import transformers as tf
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ids = tok.convert_tokens_to_ids
    # sliding_window spans the tiny sequences: HF counts the window in token slots, so with a window shorter than
    # the sequence the masked image tokens still take slots and masking differs from deleting (see model_family)
    text = _text_config(tok, head_dim=16, sliding_window=512, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"])
    vision = {**VISION, "image_size": 28, "patch_size": 7}  # 4x4 patches, pooled to 2x2 = 4 image tokens
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                             image_token_index=ids("<image_soft_token>"), boi_token_index=ids("<start_of_image>"),
                             eoi_token_index=ids("<end_of_image>"))
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    processor = tf.Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template,
                                   image_seq_length=4)
    return config, tf.Gemma3ForConditionalGeneration, processor


def _llava_onevision(tok):
    import transformers as tf
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    ids = tok.convert_tokens_to_ids
    vision = {**VISION, "image_size": 28, "patch_size": 14}  # 2x2 patches per crop
    config = tf.LlavaOnevisionConfig(text_config={"model_type": "qwen2", **_text_config(tok)}, vision_config=vision,
                                     image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                     vision_feature_select_strategy="full", vision_feature_layer=-1,
                                     image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]])
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                                      image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]])
    processor = _without_video(tf.LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=4, vision_feature_select_strategy="full",
        chat_template=tok.chat_template)
    return config, tf.LlavaOnevisionForConditionalGeneration, processor


def _idefics(family: str, tok, image_splitting: bool):
    import transformers as tf

    ids = tok.convert_tokens_to_ids
    vision = {**VISION, "image_size": 28, "patch_size": 7}  # 16 patches, scale factor 2 -> 4 image tokens
    text = {"model_type": "llama", **_text_config(tok)}
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    config_cls, model_cls = ((tf.Idefics3Config, tf.Idefics3ForConditionalGeneration) if family == "idefics3"
                             else (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration))
    config = config_cls(text_config=text, vision_config=vision, scale_factor=2, image_token_id=ids("<image>"))
    # SmolVLM lays out its image tokens as Idefics3 does; its own processor needs `num2words`, not installed here,
    # so both tiny models use Idefics3's processor. Image splitting on (their real default): a 56x56 image becomes a
    # 2x2 grid of 28x28 crops plus the 28x28 global image, 4 tokens each, with the grid tags around them; off: the
    # global image only
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=image_splitting,
                                                size={"longest_edge": 56 if image_splitting else 28},
                                                max_image_size={"longest_edge": 28})
    processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                     chat_template=tok.chat_template)
    return config, model_cls, processor


def _internvl(tok):
    import transformers as tf
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ids = tok.convert_tokens_to_ids
    vision = {**VISION, "image_size": [28, 28], "patch_size": [7, 7], "use_absolute_position_embeddings": True}
    config = tf.InternVLConfig(text_config={"model_type": "qwen2", **_text_config(tok)}, vision_config=vision,
                               image_token_id=ids("<IMG_CONTEXT>"), downsample_ratio=0.5)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=False)
    processor = _without_video(tf.InternVLProcessor)(image_processor=image_processor, tokenizer=tok,
                                                     image_seq_length=4, chat_template=tok.chat_template)
    return config, tf.InternVLForConditionalGeneration, processor


def build_tiny_family(family: str, seed: int = 0, image_splitting: bool = True):
    """(model, processor) of a tiny random VLM of `family` (a key of FAMILY_TOKENS, i.e. a config.model_type).

    image_splitting: Idefics3 / SmolVLM only, their processors' do_image_splitting (on by default, as theirs).

    fp32, sdpa attention (eager for Gemma 3's sliding window), eval mode off (as from_pretrained leaves it).
    """
    if family not in FAMILY_TOKENS:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    tok = build_family_tokenizer(family)
    if family.startswith("qwen"):
        config, model_cls, processor = _qwen(family, tok)
    elif family == "gemma3":
        config, model_cls, processor = _gemma3(tok)
    elif family == "llava_onevision":
        config, model_cls, processor = _llava_onevision(tok)
    elif family in ("idefics3", "smolvlm"):
        config, model_cls, processor = _idefics(family, tok, image_splitting)
    else:
        config, model_cls, processor = _internvl(tok)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        if family == "gemma3":  # HF initializes Gemma 3's image projection to zeros: the image would change nothing
            torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model, processor


__all__ = ["IMAGE_SIZE", "TINY_FAMILIES", "build_family_tokenizer", "build_tiny_family"]
