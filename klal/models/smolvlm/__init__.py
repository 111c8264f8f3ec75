"""SmolVLM (``HuggingFaceTB/SmolVLM-256M-Instruct`` and larger: ``model_type`` ``idefics3``,
``Idefics3ForConditionalGeneration``); :data:`FAMILY` describes it.

Facts read from the installed transformers classes (``Idefics3ForConditionalGeneration``, ``Idefics3Processor``, the
PIL ``Idefics3ImageProcessor``) and the public configs of SmolVLM-256M/500M-Instruct (``size`` longest edge 2048,
``max_image_size`` 512, a SigLIP-style tower with 16-px patches at 512 px, ``scale_factor`` 4, ``image_seq_len`` 64):

* **image splitting** (:mod:`klal.models.smolvlm.geometry`): the processor squashes the image so that its longest
  edge is ``size`` (the other edge keeps the aspect, made even), then squashes it again up to whole multiples of
  ``max_image_size`` ``M`` on both axes, and cuts that into ``R x C`` tiles of ``M x M``, followed by a *global* view
  (the whole image squashed to ``M x M``). An image whose second resize is one tile has only the global view;
* each view goes through the tower (``M / patch`` patches a side) and the connector's **pixel shuffle**, which folds
  ``scale_factor x scale_factor`` neighbouring patches into one token: ``n = M / (patch * scale_factor)`` tokens a
  side (8 on the real checkpoints), row-major;
* the prompt's ``<image>`` becomes, per tile row, ``<fake_token_around_image><row_r_col_c>`` + ``n * n`` ``<image>``
  per tile, a newline, then ``\\n<fake_token_around_image><global-img>`` + ``n * n`` ``<image>`` +
  ``<fake_token_around_image>``. Only ``<image>`` tokens are cells (the default
  :meth:`~klal.models.family.VLMFamily.visual_token_mask`); the separators are other tokens. So an image is
  **tile-major**: one ``n x n`` grid per tile (row-major over the tiles), then the global view's, each with its own
  footprint; :meth:`SmolVLMFamily.merge_grids` stitches the tiles into one ``(R n) x (C n)`` map and adds the global
  map resampled onto it through the footprints;
* the language model is Llama under ``model.text_model.layers`` (not ``language_model``); 1-D positions; chat turns
  ``User:`` / ``Assistant:`` closed by ``<end_of_utterance>``.

The tiny model (``tiny-smolvlm``): 64-px tiles seen by 8-px patches shuffled 2 x 2 into 4 x 4 tokens, longest edge 128
(up to 2 x 2 tiles and the global view: 80 visual tokens), two Llama layers; the tiny Qwen2 byte-level tokenizer with
SmolVLM's image and chat tokens added.
"""

from __future__ import annotations

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
from klal.models.smolvlm.geometry import split_layout
from klal.models.tiles import TileLayout, TileMajorFamily

TINY_TILE = 64
TINY_LONGEST = 128
TINY_PATCH = 8
TINY_SCALE = 2

IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
"""SmolVLM's image and end-of-turn tokens (the tiny tokenizer adds them, then the 6 x 6 tile tokens)."""
TILE_TOKENS = tuple(f"<row_{r + 1}_col_{c + 1}>" for r in range(6) for c in range(6))
"""``<row_r_col_c>``: the tokens that open each tile (the processor looks up all 36)."""

CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""SmolVLM-Instruct's chat format: ``<|im_start|>User:<image>question<end_of_utterance>\\nAssistant:``."""


class SmolVLMFamily(TileMajorFamily):
    """SmolVLM / Idefics3: image splitting into tiles plus a global view (tile-major grids), pixel shuffle."""

    name = "smolvlm"
    model_type = "idefics3"
    label = "SmolVLM"
    tiny_alias = "tiny-smolvlm"
    input_keys = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    image_input_keys = ("pixel_values", "pixel_attention_mask")
    pixel_bounds = False
    stock_processor = "Idefics3Processor"
    end_of_turn = "<end_of_utterance>"
    # The template writes "Assistant: answer" but its generation prompt ends at "Assistant:".
    answer_prefix = " "
    decoder_name = "text_model"  # Idefics3 does not call its Llama decoder language_model

    # -- classes -----------------------------------------------------------------------------------------------------
    def model_class(self) -> type:
        import transformers

        return transformers.Idefics3ForConditionalGeneration

    def fsdp_wrap_classes(self, vision_blocks: bool) -> set[type]:
        from transformers.models.idefics3.modeling_idefics3 import Idefics3EncoderLayer
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return {LlamaDecoderLayer, Idefics3EncoderLayer} if vision_blocks else {LlamaDecoderLayer}

    def eager_attention(self) -> Callable[..., Any]:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward

    # -- processors ----------------------------------------------------------------------------------------------
    def tiny_tokenizer(self) -> Any:
        return tiny_tokenizer()

    def make_tiny_processor(self, min_pixels: int, max_pixels: int) -> Any:
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": TINY_LONGEST},
            max_image_size={"longest_edge": TINY_TILE},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            resample=1,
        )
        side = TINY_TILE // TINY_PATCH // TINY_SCALE
        return Idefics3Processor(
            image_processor, tiny_tokenizer(), image_seq_len=side * side, chat_template=CHAT_TEMPLATE
        )

    def read_processor(self, source: str, min_pixels: int, max_pixels: int) -> Any:
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        processor_dict, tokenizer, chat_template = read_chat_parts(Idefics3Processor, source)
        return Idefics3Processor(
            Idefics3ImageProcessorPil.from_pretrained(source),
            tokenizer,
            image_seq_len=int(processor_dict.get("image_seq_len", 169)),
            chat_template=chat_template,
        )

    def check_pair(self, model: Any, processor: Any, source: str) -> None:
        cfg, ip = model.config, processor.image_processor
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size // cfg.scale_factor
        pairs = {
            "image_token_id": (cfg.image_token_id, processor.image_token_id),
            "tokens per view / image_seq_len": (side * side, processor.image_seq_len),
            "vision image_size / max_image_size": (vc.image_size, ip.max_image_size["longest_edge"]),
            "patches cover the view": (vc.image_size, side * cfg.scale_factor * vc.patch_size),
        }
        refuse_mismatch(pairs, source)
        if not (ip.do_resize and ip.do_image_splitting and ip.size.get("longest_edge")):
            raise ValueError(
                f"processor of {source!r}: klal supports SmolVLM with do_resize, do_image_splitting and a "
                "size.longest_edge (the checkpoints' defaults)"
            )

    def save_stock_processor(self, processor: Any, out: str) -> None:
        """``processor.save_pretrained`` with the stock image-processor type in ``processor_config.json``."""
        save_with_stock_image_processor(processor, out, "Idefics3ImageProcessor", self.stock_processor)

    # -- tiny model ----------------------------------------------------------------------------------------------
    def tiny_config(self, tokenizer: Any, **overrides: Any) -> Any:
        """The tiny config: a 2-layer 64-px tower with 8-px patches, pixel shuffle 2, two Llama layers.

        ``overrides`` are text-config fields by name, vision fields with a ``vision_`` prefix, whole ``text_config``
        / ``vision_config`` dicts, or ``scale_factor``.

        Raises:
            ValueError: an unknown override.
        """
        from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

        text: dict[str, Any] = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        }
        vision: dict[str, Any] = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_TILE,
            "patch_size": TINY_PATCH,
        }
        special = {"scale_factor": TINY_SCALE}
        fields = (set(LlamaConfig().to_dict()), set(Idefics3VisionConfig().to_dict()))
        apply_tiny_overrides(text, vision, overrides, fields, self.label, special)
        text.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_utterance>"),
            bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        )
        return Idefics3Config(
            text_config={**LlamaConfig(**text).to_dict(), "model_type": "llama"},
            vision_config=Idefics3VisionConfig(**vision).to_dict(),
            scale_factor=special["scale_factor"],
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            tie_word_embeddings=False,
        )

    # -- geometry ------------------------------------------------------------------------------------------------
    def layout(self, processor: Any, height: int, width: int) -> TileLayout:
        """The image's splitting layout under ``processor``'s settings (:func:`split_layout`)."""
        ip = processor.image_processor
        side = int(round(float(processor.image_seq_len) ** 0.5))
        tile = int(ip.max_image_size["longest_edge"])
        return split_layout(height, width, int(ip.size["longest_edge"]), tile, side)

    def image_token_count(self, processor: Any, height: int, width: int) -> int:
        """The ``<image>`` cells plus the separators: a ``<fake_token_around_image>`` and a ``<row_r_col_c>`` per
        tile, a newline per tile row, then a newline, ``<fake_token_around_image><global-img>`` and the closing
        ``<fake_token_around_image>`` (without tiles: no newlines), minus the one ``<image>`` placeholder."""
        lay = self.layout(processor, height, width)
        n = lay.side * lay.side
        tiles = lay.rows * lay.cols
        separators = 2 * tiles + (lay.rows + 1 if tiles else 0) + 3
        return n * (tiles + 1) + separators - 1

    def image_grids(self, processor: Any, enc: Mapping[str, Any], num_images: int) -> list[list[Grid]]:
        """From the prompts' tokens: per image, its ``<row_r_col_c>`` tokens give the tiling (the processor returns
        no image sizes)."""
        if not num_images:
            return []
        tok = processor.tokenizer
        image_id, global_id = processor.image_token_id, tok.convert_tokens_to_ids("<global-img>")
        tile_ids = {tok.convert_tokens_to_ids(t) for t in TILE_TOKENS}
        side = int(round(float(processor.image_seq_len) ** 0.5))
        out: list[list[Grid]] = []
        for b, ids in enumerate(enc["input_ids"]):
            ids = np.asarray(ids).tolist()
            tiles, cells = 0, 0
            for t in ids:
                if t in tile_ids:
                    tiles += 1
                elif t == global_id:
                    out.append([(side, side)] * (tiles + 1))
                    cells += side * side * (tiles + 1)
                    tiles = 0
            if cells != ids.count(image_id):
                n_ids = ids.count(image_id)
                raise RuntimeError(f"{self.label}: prompt {b} holds {n_ids} <image> tokens, its tiles make {cells}")
        if len(out) != num_images:
            raise RuntimeError(f"the processor's prompts hold {len(out)} images for {num_images} images")
        return out


def tiny_tokenizer() -> Any:
    """The tiny Qwen2 tokenizer (:func:`klal.models.qwen2_5_vl.tiny.build_tiny_tokenizer`: byte-level BPE, as
    SmolLM2's) with SmolVLM's image, tile and end-of-utterance tokens added as special tokens, and its chat
    template."""
    from klal.models.qwen2_5_vl.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [*IMAGE_TOKENS, *TILE_TOKENS]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


FAMILY = register_family(SmolVLMFamily())
