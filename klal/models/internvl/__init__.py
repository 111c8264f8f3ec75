"""InternVL (``OpenGVLab/InternVL3-1B-hf`` and larger, ``InternVLForConditionalGeneration``); :data:`FAMILY`
describes it.

Facts read from the installed transformers classes (``InternVLForConditionalGeneration``, ``InternVLProcessor``, the
PIL ``GotOcr2ImageProcessor`` it uses) and the public configs of InternVL3-1B-hf (448-px tiles, 14-px patches,
``downsample_ratio`` 0.5, ``image_seq_length`` 256, ``crop_to_patches`` with 1 to 12 tiles, BICUBIC):

* **dynamic tiles** (:func:`klal.models.internvl.geometry.tile_layout`): the image processor picks the ``C x R`` tile
  arrangement (``min_patches <= R C <= max_patches``) whose aspect is closest to the image's
  (``get_optimal_tiled_canvas``), squashes the image to ``C S x R S`` (``S`` the tile side) and cuts it into tiles
  row-major, then adds a **thumbnail** (the whole image squashed to ``S x S``) when there is more than one tile;
* each view goes through the tower (``S / patch`` patches a side, the CLS token dropped) and the **pixel shuffle**
  (2 x 2 patches per token at ``downsample_ratio`` 0.5): ``n = S / patch / 2`` tokens a side (16 on the real
  checkpoints), row-major;
* the prompt's ``<IMG_CONTEXT>`` placeholder becomes ``<img>``, ``n * n`` ``<IMG_CONTEXT>`` per view, ``</img>``:
  only the ``<IMG_CONTEXT>`` tokens are cells. So an image is **tile-major**
  (:class:`klal.models.tiles.TileMajorFamily`): one ``n x n`` grid per tile, then the thumbnail's;
* the language model is Qwen2 under ``model.language_model``; 1-D positions; Qwen chat turns closed by
  ``<|im_end|>``.

The tiny model (``tiny-internvl``): 112-px tiles seen by 14-px patches shuffled 2 x 2 into 4 x 4 tokens, 1 to 4 tiles
plus the thumbnail (up to 80 visual tokens), two Qwen2 layers; the tiny Qwen2 byte-level tokenizer with InternVL's
image tokens added.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from klal.models.family import (
    Grid,
    apply_tiny_overrides,
    read_chat_parts,
    refuse_mismatch,
    register_family,
    save_with_stock_image_processor,
)
from klal.models.internvl.geometry import tile_layout
from klal.models.tiles import TileLayout, TileMajorFamily

TINY_TILE = 112
TINY_PATCH = 14
TINY_MAX_TILES = 4

NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
"""The tokenizer attributes ``InternVLProcessor`` reads (``tokenizer.start_image_token`` and its ``_id``)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>{{ '\\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
"""InternVL's (Qwen2) chat format: ``<IMG_CONTEXT>`` then a newline per image, then the text."""


def _processor_class() -> type:
    from transformers.models.internvl.processing_internvl import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextInternVLProcessor(InternVLProcessor):
        """:class:`~transformers.InternVLProcessor` for text and images only (no video processor, so no torchvision);
        serialised under the stock name."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None):
            # Mirrors InternVLProcessor.__init__ without the video processor (ProcessorMixin refuses a missing one).
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            name_tokens(tokenizer)
            self.image_seq_length = image_seq_length
            self.start_image_token = tokenizer.start_image_token
            self.end_image_token = tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token = tokenizer.context_image_token
            self.video_token = tokenizer.video_token
            self.image_token_id = tokenizer.context_image_token_id
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
            )

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            """Tokenise ``text`` and process ``images`` exactly like the stock processor."""
            if videos is not None:
                raise ValueError("klal's InternVL processor handles images only; videos are not supported")
            return super().__call__(images=images, text=text, **kwargs)

        def to_dict(self) -> dict[str, Any]:
            out = super().to_dict()
            out["processor_class"] = "InternVLProcessor"
            return out

    return ImageTextInternVLProcessor


def name_tokens(tokenizer: Any) -> Any:
    """Set the named image tokens (:data:`NAMED_TOKENS`) and their ids on ``tokenizer`` (a checkpoint's tokenizer
    carries them in its config; klal's tiny one and a reloaded export get them here); returns it."""
    for attr, token in NAMED_TOKENS.items():
        if getattr(tokenizer, attr, None) is None or getattr(tokenizer, f"{attr}_id", None) is None:
            setattr(tokenizer, attr, token)
            setattr(tokenizer, f"{attr}_id", tokenizer.convert_tokens_to_ids(token))
    return tokenizer


class InternVLFamily(TileMajorFamily):
    """InternVL: dynamic tiles plus a thumbnail (tile-major grids), pixel shuffle, Qwen2 decoder."""

    name = "internvl"
    model_type = "internvl"
    label = "InternVL"
    tiny_alias = "tiny-internvl"
    input_keys = ("input_ids", "attention_mask", "pixel_values")
    image_input_keys = ("pixel_values",)
    pixel_bounds = False
    stock_processor = "InternVLProcessor"
    end_of_turn = "<|im_end|>"

    # -- classes -----------------------------------------------------------------------------------------------------
    def model_class(self) -> type:
        import transformers

        return transformers.InternVLForConditionalGeneration

    def fsdp_wrap_classes(self, vision_blocks: bool) -> set[type]:
        from transformers.models.internvl.modeling_internvl import InternVLVisionLayer
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

        return {Qwen2DecoderLayer, InternVLVisionLayer} if vision_blocks else {Qwen2DecoderLayer}

    def eager_attention(self) -> Callable[..., Any]:
        from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

        return eager_attention_forward

    # -- processors ----------------------------------------------------------------------------------------------
    def tiny_tokenizer(self) -> Any:
        return tiny_tokenizer()

    def make_tiny_processor(self, min_pixels: int, max_pixels: int) -> Any:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        image_processor = GotOcr2ImageProcessorPil(
            size={"height": TINY_TILE, "width": TINY_TILE},
            crop_to_patches=True,
            min_patches=1,
            max_patches=TINY_MAX_TILES,
            resample=3,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
        side = TINY_TILE // TINY_PATCH // 2
        return _processor_class()(
            image_processor, tiny_tokenizer(), image_seq_length=side * side, chat_template=CHAT_TEMPLATE
        )

    def read_processor(self, source: str, min_pixels: int, max_pixels: int) -> Any:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        cls = _processor_class()
        processor_dict, tokenizer, chat_template = read_chat_parts(cls, source)
        ip = GotOcr2ImageProcessorPil.from_pretrained(source)
        # InternVLProcessor's own default: its checkpoints tile images (the image processor's default is off).
        ip.crop_to_patches = bool(processor_dict.get("crop_to_patches", True) or ip.crop_to_patches)
        return cls(
            ip,
            name_tokens(tokenizer),
            image_seq_length=int(processor_dict.get("image_seq_length", 256)),
            chat_template=chat_template,
        )

    def check_pair(self, model: Any, processor: Any, source: str) -> None:
        cfg, ip = model.config, processor.image_processor
        vc = cfg.vision_config
        side = int(vc.image_size[0]) // int(vc.patch_size[0]) // int(round(1 / cfg.downsample_ratio))
        refuse_mismatch(
            {
                "image_token_id": (cfg.image_token_id, processor.image_token_id),
                "tokens per view / image_seq_length": (side * side, processor.image_seq_length),
                "vision image_size / size": (int(vc.image_size[0]), int(ip.size["height"])),
                "vision image_size / size (width)": (int(vc.image_size[1]), int(ip.size["width"])),
                "vision_feature_select_strategy": (cfg.vision_feature_select_strategy, "default"),
            },
            source,
        )
        if not ip.crop_to_patches:
            raise ValueError(f"processor of {source!r}: klal supports InternVL with crop_to_patches (dynamic tiles)")

    def save_stock_processor(self, processor: Any, out: str) -> None:
        """``processor.save_pretrained`` with the stock image-processor type in ``processor_config.json``."""
        save_with_stock_image_processor(processor, out, "GotOcr2ImageProcessor", self.stock_processor)

    # -- tiny model ----------------------------------------------------------------------------------------------
    def tiny_config(self, tokenizer: Any, **overrides: Any) -> Any:
        """The tiny config: a 2-layer 112-px tower with 14-px patches, pixel shuffle 0.5, two Qwen2 layers.

        ``overrides`` are text-config fields by name, vision fields with a ``vision_`` prefix, or whole
        ``text_config`` / ``vision_config`` dicts.

        Raises:
            ValueError: an unknown override.
        """
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        text: dict[str, Any] = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        }
        vision: dict[str, Any] = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [TINY_TILE, TINY_TILE],
            "patch_size": [TINY_PATCH, TINY_PATCH],
        }
        fields = (set(Qwen2Config().to_dict()), set(InternVLVisionConfig().to_dict()))
        apply_tiny_overrides(text, vision, overrides, fields, self.label)
        for key in ("image_size", "patch_size"):
            if isinstance(vision[key], int):
                vision[key] = [vision[key], vision[key]]
        text.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            bos_token_id=None,
        )
        return InternVLConfig(
            text_config={**Qwen2Config(**text).to_dict(), "model_type": "qwen2"},
            vision_config=InternVLVisionConfig(**vision).to_dict(),
            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=(int(vision["image_size"][0]) // int(vision["patch_size"][0]) // 2) ** 2,
            tie_word_embeddings=False,
        )

    # -- geometry ------------------------------------------------------------------------------------------------
    def layout(self, processor: Any, height: int, width: int) -> TileLayout:
        """The image's tiles under ``processor``'s settings (:func:`tile_layout`)."""
        ip = processor.image_processor
        side = int(round(float(processor.image_seq_length) ** 0.5))
        tile = (int(ip.size["height"]), int(ip.size["width"]))
        return tile_layout(height, width, tile, int(ip.min_patches), int(ip.max_patches), side)

    def image_token_count(self, processor: Any, height: int, width: int) -> int:
        """The views' ``<IMG_CONTEXT>`` cells plus ``<img>`` and ``</img>``, minus the one placeholder."""
        lay = self.layout(processor, height, width)
        return lay.side * lay.side * (lay.rows * lay.cols + 1) + 1

    def image_grids(self, processor: Any, enc: Mapping[str, Any], num_images: int) -> list[list[Grid]]:
        """From the prompts' tokens: per image, its ``<IMG_CONTEXT>`` run between ``<img>`` and ``</img>`` gives its
        number of views (the tiles' arrangement is the image size's: :meth:`footprints`)."""
        if not num_images:
            return []
        start, end = processor.start_image_token_id, processor.end_image_token_id
        per_view = int(processor.image_seq_length)
        side = int(round(per_view**0.5))
        out: list[list[Grid]] = []
        for b, ids in enumerate(enc["input_ids"]):
            ids = np.asarray(ids)
            starts, ends = np.nonzero(ids == start)[0], np.nonzero(ids == end)[0]
            if len(starts) != len(ends):
                raise RuntimeError(f"{self.label}: prompt {b} has {len(starts)} <img> but {len(ends)} </img>")
            for s, e in zip(starts, ends):
                n = int((ids[s + 1 : e] == processor.image_token_id).sum())
                if n % per_view or e - s - 1 != n:
                    raise RuntimeError(f"{self.label}: prompt {b} has an image of {n} tokens ({per_view} per view)")
                out.append([(side, side)] * (n // per_view))
        if len(out) != num_images:
            raise RuntimeError(f"the processor's prompts hold {len(out)} images for {num_images} images")
        return out


def tiny_tokenizer() -> Any:
    """The tiny Qwen2 tokenizer (:func:`klal.models.qwen2_5_vl.tiny.build_tiny_tokenizer`, as InternVL3's Qwen2.5
    one) with InternVL's image tokens added as special tokens and named, and its chat template."""
    from klal.models.qwen2_5_vl.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(NAMED_TOKENS.values())})
    tok.chat_template = CHAT_TEMPLATE
    return name_tokens(tok)


FAMILY = register_family(InternVLFamily())
