"""What the Qwen-VL line shares (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): one :class:`QwenVLFamily` each differs from
only by class names, patch size and the few facts its subclass sets.

Shared facts (read from the transformers sources of each class, not assumed):

* one grid per image: ``image_grid_thw = (t, h, w)`` counts ``patch``-px patches and the merger joins ``merge x merge``
  of them, so an image gives ``h / merge x w / merge`` visual tokens, row-major, every one an ``<|image_pad|>``
  token between ``<|vision_start|>`` and ``<|vision_end|>``. ``patch`` is 14 on Qwen2/2.5-VL and 16 on Qwen3-VL and
  Qwen3.5; ``merge`` is 2 on all four;
* the processor resizes with ``smart_resize`` (:mod:`klal.models.qwen2_vl.geometry`) to the ``min_pixels`` /
  ``max_pixels`` budget, with the same image processor class (``Qwen2VLImageProcessor``) on every member;
* 3-D (mrope) positions derived from ``mm_token_type_ids``, which the processor returns and the collator keeps: the
  model's ``get_rope_index`` numbers a prompt, a generated token takes the row's next text position on all axes;
* the language model's layers under ``model.language_model.layers``, vision blocks under ``model.visual.blocks``.

klal builds the processors without the video processor (:class:`ImageTextProcessorMixin`): transformers cannot
build the stock ones without torchvision, and klal never feeds videos. An export writes the stock layout.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from klal.models.family import Grid, VLMFamily, apply_tiny_overrides, read_chat_parts
from klal.models.qwen2_vl.geometry import smart_resize_hw
from klal.models.qwen2_vl.tiny import (
    CHAT_TEMPLATE,
    QWEN2_SPECIAL_TOKENS,
    TINY_TEXT_DEFAULTS,
    build_tiny_tokenizer,
    default_mrope_section,
)

# Image-processor fields the stock video processor shares (it reads frames with the same patch geometry).
_VIDEO_FIELDS = (
    "size",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "do_normalize",
    "do_rescale",
    "do_resize",
    "rescale_factor",
    "resample",
)


class ImageTextProcessorMixin:
    """Makes a Qwen-VL processor class work for text and images without its video processor (no torchvision).

    Mixed in before the stock class (``class P(ImageTextProcessorMixin, Qwen2_5_VLProcessor)``): the constructor sets
    the token attributes the stock constructor sets and builds the processor from the image processor and tokenizer
    only; calls with videos are refused; :meth:`to_dict` names the stock class, so a saved ``processor_config.json``
    reads like a hub one.
    """

    stock_name: ClassVar[str] = ""

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None, **kwargs) -> None:
        from transformers.processing_utils import ProcessorMixin

        for attr, token in (
            ("image_token", "<|image_pad|>"),
            ("video_token", "<|video_pad|>"),
            ("vision_start_token", "<|vision_start|>"),
            ("vision_end_token", "<|vision_end|>"),
        ):
            value = getattr(tokenizer, attr, None) or token
            setattr(self, attr, value)
            setattr(
                self, f"{attr}_id", getattr(tokenizer, f"{attr}_id", None) or tokenizer.convert_tokens_to_ids(value)
            )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        """Tokenise ``text`` and process ``images`` exactly like the stock processor."""
        if videos is not None:
            raise ValueError("klal's Qwen-VL processors handle images only; videos are not supported")
        return super().__call__(images=images, text=text, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Serialise under the stock class name."""
        out = super().to_dict()
        out["processor_class"] = self.stock_name
        return out


class QwenVLFamily(VLMFamily):
    """A member of the Qwen-VL line; subclasses set the class names and sizes below.

    Attributes:
        modeling: the transformers modeling module of the family.
        model_class_name: its ``...ForConditionalGeneration``.
        config_class_name: its top-level config class.
        decoder_layer_name: its language decoder layer class (an FSDP unit).
        vision_block_name: its vision block class (an FSDP unit when the tower trains).
        processor_path: ``module:Class`` of the stock processor klal's image-only processor derives from.
        stock_video_processor: the stock video processor class an export names.
        patch: vision patch side in px.
        tiny_text: text-config fields of the tiny model beyond the shared ones.
        tiny_vision: vision-config fields of the tiny model.
    """

    input_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    image_input_keys = ("pixel_values", "image_grid_thw")
    end_of_turn = "<|im_end|>"
    # 0 = text: the model numbers text tokens 1-D and image tokens 3-D from it (dropping it silently gives 1-D).
    token_inputs = {"mm_token_type_ids": 0}
    modeling: ClassVar[str]
    model_class_name: ClassVar[str]
    config_class_name: ClassVar[str]
    decoder_layer_name: ClassVar[str]
    vision_block_name: ClassVar[str]
    processor_path: ClassVar[str]
    stock_processor: ClassVar[str]
    stock_video_processor: ClassVar[str]
    stock_image_processor: ClassVar[str] = "Qwen2VLImageProcessor"
    patch: ClassVar[int]
    merge: ClassVar[int] = 2
    tiny_text: ClassVar[Mapping[str, Any]] = {}
    tiny_vision: ClassVar[Mapping[str, Any]] = {}

    # -- classes -----------------------------------------------------------------------------------------------------
    def _modeling(self) -> Any:
        return importlib.import_module(self.modeling)

    def model_class(self) -> type:
        return getattr(self._modeling(), self.model_class_name)

    def config_class(self) -> type:
        import transformers

        return getattr(transformers, self.config_class_name)

    def processor_class(self) -> type:
        """klal's image-only processor class for this family (a subclass of the stock one)."""
        return _image_text_processor(self.processor_path, self.stock_processor)

    def fsdp_wrap_classes(self, vision_blocks: bool) -> set[type]:
        mod = self._modeling()
        units = {getattr(mod, self.decoder_layer_name)}
        return units | {getattr(mod, self.vision_block_name)} if vision_blocks else units

    def eager_attention(self) -> Callable[..., Any]:
        return self._modeling().eager_attention_forward

    # -- processors ----------------------------------------------------------------------------------------------
    def image_processor(self, min_pixels: int, max_pixels: int, source: str | None = None) -> Any:
        """The PIL ``Qwen2VLImageProcessor`` with these bounds (from ``source``'s preprocessor config when given).

        Raises:
            RuntimeError: the processor did not take the bounds (an old preprocessor config that overrides them).
        """
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if source is None:
            return Qwen2VLImageProcessorPil(
                min_pixels=min_pixels, max_pixels=max_pixels, patch_size=self.patch, merge_size=self.merge
            )
        # Passed as keywords so they win over min_pixels/max_pixels stored in older checkpoints' preprocessor configs.
        ip = Qwen2VLImageProcessorPil.from_pretrained(source, min_pixels=min_pixels, max_pixels=max_pixels)
        size = ip.size
        if (size["shortest_edge"], size["longest_edge"]) != (min_pixels, max_pixels):
            raise RuntimeError(
                f"image processor of {source!r} ignored min_pixels/max_pixels: got size {dict(size)}, "
                f"wanted ({min_pixels}, {max_pixels})"
            )
        return ip

    def tiny_tokenizer(self) -> Any:
        from klal.models.qwen2_vl.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer()

    def make_tiny_processor(self, min_pixels: int, max_pixels: int) -> Any:
        return self.processor_class()(
            self.image_processor(min_pixels, max_pixels), build_tiny_tokenizer(), chat_template=CHAT_TEMPLATE
        )

    def read_processor(self, source: str, min_pixels: int, max_pixels: int) -> Any:
        cls = self.processor_class()
        _, tokenizer, chat_template = read_chat_parts(cls, source)
        return cls(self.image_processor(min_pixels, max_pixels, source), tokenizer, chat_template=chat_template)

    def check_pair(self, model: Any, processor: Any, source: str) -> None:
        cfg, vis, ip = model.config, model.config.vision_config, processor.image_processor
        pairs = {
            "image_token_id": (cfg.image_token_id, processor.image_token_id),
            "patch_size": (vis.patch_size, ip.patch_size),
            "spatial_merge_size / merge_size": (vis.spatial_merge_size, ip.merge_size),
            "temporal_patch_size": (vis.temporal_patch_size, ip.temporal_patch_size),
        }
        bad = {k: v for k, v in pairs.items() if int(v[0]) != int(v[1])}
        if bad:
            detail = ", ".join(f"{k}: model {m} vs processor {p}" for k, (m, p) in bad.items())
            raise ValueError(f"processor does not match model {source!r}: {detail}")

    def save_stock_processor(self, processor: Any, out: str) -> None:
        """Write ``processor`` as transformers' stock one would be written.

        Files: the tokenizer's (``processor_class`` set to the stock class), ``processor_config.json`` with the
        ``image_processor`` and ``video_processor`` entries, the flat ``preprocessor_config.json`` and
        ``video_preprocessor_config.json`` (with ``min_pixels`` / ``max_pixels``) that older transformers and vLLM
        read, and the chat template (``chat_template.jinja``). The video processor's entries are the image
        processor's geometry; its class needs torchvision only when it is built, i.e. when loading.
        """
        processor.save_pretrained(out)
        image = processor.image_processor.to_dict()
        image = {k: v for k, v in image.items() if not k.startswith("_")}
        image["image_processor_type"] = self.stock_image_processor
        image.pop("processor_class", None)
        size = image.get("size") or {}
        bounds = {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge")}
        video = {k: image[k] for k in _VIDEO_FIELDS if k in image}
        video["video_processor_type"] = self.stock_video_processor
        stock = self.stock_processor
        path = os.path.join(out, "processor_config.json")
        config = {}
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
        config.update(image_processor=image, video_processor=video, processor_class=stock)
        _write_json(path, config)
        _write_json(os.path.join(out, "preprocessor_config.json"), {**image, **bounds, "processor_class": stock})
        _write_json(os.path.join(out, "video_preprocessor_config.json"), {**video, **bounds, "processor_class": stock})
        tok_path = os.path.join(out, "tokenizer_config.json")
        if os.path.isfile(tok_path):
            with open(tok_path) as f:
                tok = json.load(f)
            tok["processor_class"] = stock
            _write_json(tok_path, tok)
        template = processor.chat_template
        if template and not os.path.isfile(os.path.join(out, "chat_template.jinja")):
            with open(os.path.join(out, "chat_template.jinja"), "w") as f:
                f.write(template)

    # -- tiny model ----------------------------------------------------------------------------------------------
    def tiny_config(self, tokenizer: Any, **overrides: Any) -> Any:
        """The tiny config: the shared tiny sizes (:mod:`klal.models.qwen2_vl.tiny`) with this family's fields.

        ``overrides`` are text-config fields by name, vision fields with a ``vision_`` prefix, or whole
        ``text_config`` / ``vision_config`` dicts merged in.

        Raises:
            ValueError: an unknown override.
        """
        cls = self.config_class()
        text = {k: v for k, v in TINY_TEXT_DEFAULTS.items() if k not in ("use_sliding_window", "max_window_layers")}
        text.update(self.tiny_text)
        vision = dict(self.tiny_vision)
        vision_fields = init_fields(cls.sub_configs["vision_config"])
        fields = (init_fields(cls.sub_configs["text_config"]), vision_fields)
        apply_tiny_overrides(text, vision, overrides, fields, self.label)
        head_dim = text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
        rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": 1_000_000.0})
        rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        rope.setdefault("mrope_section", default_mrope_section(rotary))
        text["rope_parameters"] = rope
        if "out_hidden_size" in vision_fields:
            vision.setdefault("out_hidden_size", text["hidden_size"])
        else:
            vision.setdefault("hidden_size", text["hidden_size"])
        return qwen_config(cls, text, vision, tokenizer)

    # -- geometry ------------------------------------------------------------------------------------------------
    def resized_hw(self, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        return smart_resize_hw(height, width, min_pixels, max_pixels, factor=self.patch * self.merge)

    def grids_for_size(self, height: int, width: int, min_pixels: int, max_pixels: int) -> list[Grid]:
        factor = self.patch * self.merge
        ph, pw = self.resized_hw(height, width, min_pixels, max_pixels)
        return [(ph // factor, pw // factor)]

    def processor_grids(self, processor: Any, height: int, width: int) -> list[Grid]:
        size = processor.image_processor.size
        return self.grids_for_size(height, width, int(size["shortest_edge"]), int(size["longest_edge"]))

    def image_grids(self, processor: Any, enc: Mapping[str, Any], num_images: int) -> list[list[Grid]]:
        if not num_images:
            return []
        thw = np.asarray(enc["image_grid_thw"]).reshape(-1, 3)
        if len(thw) != num_images:
            raise RuntimeError(f"the processor returned {len(thw)} image grids for {num_images} images")
        return [[(int(h) // self.merge, int(w) // self.merge)] for _, h, w in thw.tolist()]

    # -- positions -----------------------------------------------------------------------------------------------
    def prompt_positions(self, model: Any, inputs: Mapping[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """``(3, B, S)`` mrope positions of left-padded prompts (padding at 0).

        With ``mm_token_type_ids`` the model's own ``get_rope_index`` gives them (3-D positions for image tokens,
        padding excluded); without (a text-only input) they are the running count of real tokens, on all three axes.
        """
        ids = inputs["input_ids"]
        if "mm_token_type_ids" in inputs:
            pos, _ = _rope_owner(model).get_rope_index(
                ids,
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs.get("image_grid_thw"),
                attention_mask=mask,
            )
            return pos
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[None].expand(3, -1, -1).clone()

    def step_positions(self, next_pos: torch.Tensor) -> torch.Tensor:
        b = next_pos.shape[0]
        return next_pos.view(1, b, 1).expand(3, b, 1).clone()


def _rope_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The submodule that has ``get_rope_index`` (the VLM under a peft or generation wrapper)."""
    for mod in model.modules():
        if callable(getattr(mod, "get_rope_index", None)):
            return mod
    raise RuntimeError("the model has no get_rope_index: is it a Qwen-VL model?")


def qwen_config(cls: type, text: dict[str, Any], vision: dict[str, Any], tokenizer: Any) -> Any:
    """A Qwen-VL config of class ``cls`` whose token ids are the Qwen2 special tokens of ``tokenizer``."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_SPECIAL_TOKENS}
    text = {
        **text,
        "vocab_size": len(tokenizer),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    return cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def init_fields(cls: type) -> set[str]:
    """The keyword fields a config class's constructor takes."""
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


_PROCESSOR_CLASSES: dict[str, type] = {}


def _image_text_processor(path: str, stock_name: str) -> type:
    """klal's image-only subclass of the stock processor at ``module:Class`` (made once per class)."""
    if path not in _PROCESSOR_CLASSES:
        module, name = path.split(":")
        base = getattr(importlib.import_module(module), name)
        _PROCESSOR_CLASSES[path] = type(f"ImageText{name}", (ImageTextProcessorMixin, base), {"stock_name": stock_name})
    return _PROCESSOR_CLASSES[path]
