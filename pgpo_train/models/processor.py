"""A VLM's processor: AutoProcessor, or built from its tokenizer and PIL image processor where AutoProcessor cannot
load (no torchvision for the video processor; the tiny checkpoints, which save only those two parts)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


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


def make_processor(tokenizer, image_processor):
    """A Qwen2.5-VL processor from its parts, video processor left out (see ImageOnlyQwen2_5_VLProcessor)."""
    cls = _image_only_processor_class()
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


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
