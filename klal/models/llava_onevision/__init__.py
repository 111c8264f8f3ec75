"""LLaVA-OneVision (``llava-hf/llava-onevision-qwen2-*-ov-hf``), the LLaVA line the localization-heads and EGG authors
used; :data:`FAMILY` describes it.

Facts read from the installed transformers classes (``LlavaOnevisionForConditionalGeneration``,
``LlavaOnevisionProcessor``, the PIL ``LlavaOnevisionImageProcessor``):

* SigLIP vision tower, a projector, a Qwen2 language model under ``model.language_model.layers``; 1-D positions;
* **anyres tiling**: every image gives a *base* view (the image squashed to the tower's ``image_size``, ``p x p``
  tokens, ``p = image_size / patch_size``) and *tiles* (the image resized into the best ``image_grid_pinpoints``
  resolution, padded, cut into tower-sized crops; their features are laid out as one ``(p * rows) x (p * cols)`` map,
  the padding is cut off again and, past ``anyres_max_9``, the map is shrunk bilinearly). The prompt holds, per image,
  ``p * p`` base tokens then the tile map row by row with one ``image_newline`` token after each row, all of them
  the ``<image>`` token. So an image has **two grids**, and the row ends are *separators*, not cells:
  :meth:`LlavaOnevisionFamily.visual_token_mask` leaves them out of the visual keys, so KLAL sees the base grid's
  cells then the tile grid's cells (the target map gives each grid the evidence leaves mass on an equal share), and a
  grounding method's map of an image is the tile map plus the base map resampled onto it
  (:meth:`LlavaOnevisionFamily.merge_grids`);
* **footprints** (:mod:`klal.models.llava_onevision.geometry`): neither grid is equal cells over the image. The base
  view's 27 x 27 patches of 14 px cover 378 of its 384 px (the last 1/64 of the image on each axis is seen by no base
  token); the tile map's edge rows or columns that ``unpad_image`` keeps may be part padding (unequal edge cells),
  the 6 px between tiles are seen by no patch, and past ``anyres_max_9`` each token mixes two feature rows and
  columns bilinearly. :meth:`LlavaOnevisionFamily.footprints` gives each token what it saw, which the target maps,
  evidence cells, metrics and method boxes use. A long thin image whose tile map unpads to nothing (0 rows or
  columns; transformers' processor and model accept it) keeps its row ends and has only the base grid's cells;
* klal feeds each image as a single image (the processor's ``batch_num_images`` is 1 per image), so every image gets
  its tiles, also in a sample with several images; ``min_pixels`` / ``max_pixels`` do not apply.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from klal.geometry import Footprint, footprint_overlap
from klal.models.family import Grid, VLMFamily, apply_tiny_overrides, read_chat_parts, register_family
from klal.models.llava_onevision.geometry import AnyresLayout, anyres_footprints, anyres_layout

_MODELING = "transformers.models.llava_onevision.modeling_llava_onevision"

# The tiny model: a 56-px SigLIP tower (4 x 4 base tokens) and tilings up to 3 x 3 tiles (12 x 12 tile tokens).
TINY_IMAGE_SIZE = 56
TINY_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [112, 168], [168, 112], [168, 168]]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
"""The LLaVA-OneVision (Qwen2) chat format: ``<image>`` then a newline per image, then the text."""


def _processor_class() -> type:
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextLlavaOnevisionProcessor(LlavaOnevisionProcessor):
        """:class:`~transformers.LlavaOnevisionProcessor` for text and images only (no video processor, so no
        torchvision); serialised under the stock name."""

        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            chat_template: str | None = None,
            num_image_tokens: int | None = None,
            vision_feature_select_strategy: str | None = None,
            vision_aspect_ratio: str = "anyres_max_9",
            **kwargs,
        ) -> None:
            # Mirrors LlavaOnevisionProcessor.__init__ without the video processor (ProcessorMixin refuses a missing
            # one).
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.vision_aspect_ratio = vision_aspect_ratio
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            """Tokenise ``text`` and process ``images`` exactly like the stock processor."""
            if videos is not None:
                raise ValueError("klal's LLaVA-OneVision processor handles images only; videos are not supported")
            return super().__call__(images=images, text=text, **kwargs)

        def to_dict(self) -> dict[str, Any]:
            out = super().to_dict()
            out["processor_class"] = "LlavaOnevisionProcessor"
            return out

    return ImageTextLlavaOnevisionProcessor


class LlavaOnevisionFamily(VLMFamily):
    """LLaVA-OneVision: SigLIP + Qwen2, anyres tiling (two grids per image, row-end separators)."""

    name = "llava_onevision"
    model_type = "llava_onevision"
    label = "LLaVA-OneVision"
    tiny_alias = "tiny-llava-onevision"
    input_keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")
    image_input_keys = ("pixel_values", "image_sizes", "batch_num_images")
    end_of_turn = "<|im_end|>"
    pixel_bounds = False
    stock_processor = "LlavaOnevisionProcessor"
    box_convention = "normalized_1"

    # -- classes -----------------------------------------------------------------------------------------------------
    def model_class(self) -> type:
        import transformers

        return transformers.LlavaOnevisionForConditionalGeneration

    def fsdp_wrap_classes(self, vision_blocks: bool) -> set[type]:
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
        from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

        return {Qwen2DecoderLayer, SiglipEncoderLayer} if vision_blocks else {Qwen2DecoderLayer}

    def eager_attention(self) -> Callable[..., Any]:
        from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

        return eager_attention_forward

    # -- processors ----------------------------------------------------------------------------------------------
    def tiny_tokenizer(self) -> Any:
        return tiny_tokenizer()

    def make_tiny_processor(self, min_pixels: int, max_pixels: int) -> Any:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_grid_pinpoints=TINY_PINPOINTS
        )
        side = TINY_IMAGE_SIZE // 14
        return _processor_class()(
            image_processor,
            tiny_tokenizer(),
            chat_template=TINY_CHAT_TEMPLATE,
            num_image_tokens=side * side,
            vision_feature_select_strategy="full",
        )

    def read_processor(self, source: str, min_pixels: int, max_pixels: int) -> Any:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        cls = _processor_class()
        processor_dict, tokenizer, chat_template = read_chat_parts(cls, source)
        return cls(
            LlavaOnevisionImageProcessorPil.from_pretrained(source),
            tokenizer,
            chat_template=chat_template,
            num_image_tokens=processor_dict.get("num_image_tokens"),
            vision_feature_select_strategy=processor_dict.get("vision_feature_select_strategy"),
            vision_aspect_ratio=processor_dict.get("vision_aspect_ratio", "anyres_max_9"),
        )

    def check_pair(self, model: Any, processor: Any, source: str) -> None:
        cfg, ip = model.config, processor.image_processor
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        pairs = {
            "image_token_id": (cfg.image_token_id, processor.image_token_id),
            "image_size": (cfg.vision_config.image_size, ip.size["height"]),
            "num_image_tokens": (side * side, processor.num_image_tokens),
            "image_grid_pinpoints": (
                [list(p) for p in cfg.image_grid_pinpoints],
                [list(p) for p in ip.image_grid_pinpoints],
            ),
            "vision_feature_select_strategy": (
                cfg.vision_feature_select_strategy,
                processor.vision_feature_select_strategy,
            ),
            "vision_aspect_ratio": (cfg.vision_aspect_ratio, processor.vision_aspect_ratio),
        }
        bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
        if bad:
            detail = ", ".join(f"{k}: model {m} vs processor {p}" for k, (m, p) in bad.items())
            raise ValueError(f"processor does not match model {source!r}: {detail}")

    def save_stock_processor(self, processor: Any, out: str) -> None:
        """``processor.save_pretrained`` with the stock class names (the image processor's type, a video processor
        entry with the image processor's geometry, whose class needs torchvision only when it is loaded)."""
        processor.save_pretrained(out)
        path = os.path.join(out, "processor_config.json")
        config: dict[str, Any] = {}
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
        image = {k: v for k, v in processor.image_processor.to_dict().items() if not k.startswith("_")}
        image["image_processor_type"] = "LlavaOnevisionImageProcessor"
        image.pop("processor_class", None)
        video = {k: image[k] for k in ("size", "image_mean", "image_std", "do_rescale", "rescale_factor") if k in image}
        video["video_processor_type"] = "LlavaOnevisionVideoProcessor"
        config.update(image_processor=image, video_processor=video, processor_class=self.stock_processor)
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    # -- tiny model ----------------------------------------------------------------------------------------------
    def tiny_config(self, tokenizer: Any, **overrides: Any) -> Any:
        """The tiny config: a 2-layer 56-px SigLIP tower, the shared tiny Qwen2 sizes for the language model.

        ``overrides`` are text-config fields by name, vision fields with a ``vision_`` prefix, or whole
        ``text_config`` / ``vision_config`` dicts merged in.

        Raises:
            ValueError: an unknown override.
        """
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        from klal.models.qwen2_vl.tiny import TINY_TEXT_DEFAULTS

        text = {k: v for k, v in TINY_TEXT_DEFAULTS.items() if k not in ("use_sliding_window", "max_window_layers")}
        vision: dict[str, Any] = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 14,
        }
        fields = (set(Qwen2Config().to_dict()), set(SiglipVisionConfig().to_dict()))
        apply_tiny_overrides(text, vision, overrides, fields, self.label)
        eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
        text.update(vocab_size=len(tokenizer), bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
        return LlavaOnevisionConfig(
            vision_config={**SiglipVisionConfig(**vision).to_dict(), "model_type": "siglip_vision_model"},
            text_config={**Qwen2Config(**text).to_dict(), "model_type": "qwen2"},
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=TINY_PINPOINTS,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False,
        )

    # -- geometry ------------------------------------------------------------------------------------------------
    def layout(self, processor: Any, height: int, width: int) -> AnyresLayout:
        """The image's anyres layout under ``processor``'s settings (:mod:`klal.models.llava_onevision.geometry`)."""
        ip = processor.image_processor
        return anyres_layout(
            height,
            width,
            int(ip.size["height"]),
            int(ip.size["height"]) // math.isqrt(int(processor.num_image_tokens)),
            ip.image_grid_pinpoints,
            processor.vision_aspect_ratio,
        )

    def processor_grids(self, processor: Any, height: int, width: int) -> list[Grid]:
        """``[(p, p), (rows, cols)]``: the base view and the tile map (either of ``rows``, ``cols`` may be 0 for a
        long thin image: the tile map then has no cells, only its ``rows`` row ends), by the processor's arithmetic
        (checked against its own token count)."""
        lay = self.layout(processor, height, width)
        p = lay.side
        rows, cols = lay.tile_grid
        cells, newlines = processor._get_unpadded_features(height, width, p, p, lay.y.tiles, lay.x.tiles)
        if (cells, newlines) != (rows * cols, rows):
            raise RuntimeError(
                f"{self.label}: the processor counts {cells} tile tokens in {newlines} rows for a {height} x {width} "
                f"image, klal's layout {rows} x {cols}"
            )
        return [(p, p), (rows, cols)]

    def footprints(
        self, processor: Any, height: int, width: int, grids: Sequence[Grid] | None = None
    ) -> list[Footprint | None]:
        """The base view's and the tile map's footprints (:func:`.geometry.anyres_footprints`: base patches covering
        ``p P`` of ``S`` px, part-padded edge rows, the ``anyres_max`` bilinear pooling); None for an empty tile map."""
        fps = anyres_footprints(self.layout(processor, height, width))
        if grids is not None and [None if f is None else f.shape for f in fps] != [
            None if g[0] * g[1] == 0 else tuple(g) for g in grids
        ]:
            raise RuntimeError(f"{self.label}: grids {list(grids)} do not match the {height} x {width} image's layout")
        return fps

    @staticmethod
    def map_grid(grids: Sequence[Grid]) -> Grid:
        """The tile map, or the base view when the tile map is empty (a long thin image)."""
        return tuple(grids[-1]) if grids[-1][0] * grids[-1][1] else tuple(grids[0])

    def image_token_count(self, processor: Any, height: int, width: int) -> int:
        """The two grids' cells plus one row-end token per tile row."""
        (p, _), (rows, cols) = self.processor_grids(processor, height, width)
        return p * p + rows * (cols + 1)

    def image_grids(self, processor: Any, enc: Mapping[str, Any], num_images: int) -> list[list[Grid]]:
        if not num_images:
            return []
        sizes = [
            tuple(int(v) for v in hw)
            for hw in (enc["image_sizes"].tolist() if torch.is_tensor(enc["image_sizes"]) else enc["image_sizes"])
        ]
        if len(sizes) != num_images:
            raise RuntimeError(f"the processor returned {len(sizes)} image sizes for {num_images} images")
        return [self.processor_grids(processor, h, w) for h, w in sizes]

    def visual_token_mask(
        self,
        input_ids: torch.Tensor,
        image_token_id: int,
        image_grids: Sequence[Sequence[Sequence[Grid]]] | None = None,
    ) -> torch.Tensor:
        """The image tokens that are grid cells: each image's base cells, then its tile rows without their row-end
        token. Needs ``image_grids`` (per sample, per image, its grids), since the row ends are image tokens too."""
        is_image = input_ids == image_token_id
        if image_grids is None:
            raise ValueError(f"{self.label}: the visual-token mask needs each sample's image grids (row-end tokens)")
        mask = torch.zeros_like(is_image)
        for b, grids in enumerate(image_grids):
            layout: list[bool] = []
            for image in grids:
                (p, _), (rows, cols) = image
                layout += [True] * (p * p) + ([True] * cols + [False]) * rows
            # The images' tokens come first; an <image> token a model generated after the prompt is text.
            positions = is_image[b].nonzero().flatten()[: len(layout)]
            if len(positions) != len(layout):
                raise RuntimeError(
                    f"sample {b}: {len(positions)} image tokens, but its grids {list(grids)} make {len(layout)}"
                )
            mask[b, positions] = torch.tensor(layout, dtype=torch.bool, device=mask.device)
        return mask

    def merge_grids(self, maps: Sequence[Any], footprints: Sequence[Footprint | None] | None = None) -> Any:
        """The tile map plus the base map resampled onto it: each base cell's value is spread over the tile tokens
        whose footprints overlap it, in proportion to the overlap, so the merged map's total is the sum of both
        totals. Without ``footprints``, both grids are taken as equal cells over the whole image. An empty tile map
        (a long thin image) leaves the base map."""
        import numpy as np

        if len(maps) == 1:
            return maps[0]
        base, tiles = maps
        if tiles.shape[-1] * tiles.shape[-2] == 0:
            return base
        if footprints is not None and footprints[1] is not None:
            oy = footprint_overlap(footprints[1].y, footprints[0].y)
            ox = footprint_overlap(footprints[1].x, footprints[0].x)
        else:
            oy, ox = _overlap(tiles.shape[-2], base.shape[-2]), _overlap(tiles.shape[-1], base.shape[-1])
        return tiles + np.einsum("ik,...kl,jl->...ij", oy, base, ox)

    # -- positions -----------------------------------------------------------------------------------------------
    def prompt_positions(self, model: Any, inputs: Mapping[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` 1-D positions of left-padded prompts: the running count of real tokens (padding at 0)."""
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def step_positions(self, next_pos: torch.Tensor) -> torch.Tensor:
        return next_pos[:, None].clone()


def _overlap(n_out: int, n_in: int) -> Any:
    """``(n_out, n_in)``: the share of input cell ``k`` (of ``n_in`` equal cells over [0, 1]) that output cell ``i``
    (of ``n_out``) covers; every column sums to 1."""
    import numpy as np

    lo_o, hi_o = np.arange(n_out)[:, None] / n_out, (np.arange(n_out)[:, None] + 1) / n_out
    lo_i, hi_i = np.arange(n_in)[None] / n_in, (np.arange(n_in)[None] + 1) / n_in
    return np.clip(np.minimum(hi_o, hi_i) - np.maximum(lo_o, lo_i), 0, None) * n_in


def tiny_tokenizer() -> Any:
    """The tiny Qwen2 tokenizer (:func:`klal.models.qwen2_5_vl.tiny.build_tiny_tokenizer`) with ``<image>`` and
    ``<video>`` added as special tokens, as the LLaVA-OneVision checkpoints add them."""
    from klal.models.qwen2_vl.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tok


FAMILY = register_family(LlavaOnevisionFamily())
