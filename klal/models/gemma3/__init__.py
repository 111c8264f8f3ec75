"""Gemma 3 (``google/gemma-3-*-it``, ``Gemma3ForConditionalGeneration``): :data:`FAMILY` describes it.

Facts read from the installed transformers classes (``Gemma3ForConditionalGeneration``, ``Gemma3Processor``, the PIL
``Gemma3ImageProcessor``) and the published configs (4B/12B/27B: SigLIP at 896 px, 14-px patches,
``mm_tokens_per_image`` 256, sliding window 1024 on five of every six language layers):

* **one grid per image**: the image processor squashes the image to the tower's ``image_size`` (896 x 896, aspect not
  kept), the tower cuts ``image_size / patch`` patches a side (64) and the projector average-pools them
  ``k x k`` (4) into ``sqrt(mm_tokens_per_image)`` tokens a side (16 x 16 = 256), row-major. So every token covers an
  equal ``1/16 x 1/16`` share of the original image. Pan-and-scan (extra crops of long images) is off, as in the
  processor's defaults; klal refuses a processor with it on;
* the prompt's ``<start_of_image>`` placeholder is expanded by the processor into ``\\n\\n<start_of_image>``, 256
  ``<image_soft_token>`` and ``<end_of_image>\\n\\n``: the *soft* token is one grid cell
  (:meth:`Gemma3Family.grid_token_id`), while ``processor.image_token_id`` is the ``<start_of_image>`` placeholder
  (in transformers 5.25; older releases set it to the soft token, so klal reads the tokenizer's ``image_token``);
* ``token_type_ids`` (1 on the soft tokens) make the model's mask bidirectional inside each image; the collator keeps
  and pads them (:attr:`Gemma3Family.token_inputs`). The processor takes the images nested per prompt;
* the language model alternates **sliding-window** layers (a query sees the last ``sliding_window`` keys) with
  full-attention layers (``text_config.layer_types``). A window can hide an image from a query that lies far after it,
  where that query's attention over the visual tokens is not defined, so KLAL, the capture's layer specs and every
  attention method act on the **full-attention layers** (:meth:`Gemma3Family.attention_layers`), as on Qwen3.5's hybrid
  model; the capture still equals eager attention on the sliding layers (it reads each layer's own mask);
* 1-D positions; chat turns ``<start_of_turn>user`` / ``<start_of_turn>model`` closed by ``<end_of_turn>``.

The tiny model (``tiny-gemma3``): a 224-px SigLIP tower with 14-px patches pooled 2 x 2 into 8 x 8 = 64 visual tokens,
four language layers (sliding, full, sliding, full) with a 24-token window, so on the training prompts the window hides
part of the image from the answer tokens at the sliding layers; a byte-fallback BPE tokenizer with Gemma's special
tokens and chat format, built offline.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from klal.models.family import (
    Grid,
    VLMFamily,
    apply_tiny_overrides,
    read_chat_parts,
    refuse_mismatch,
    register_family,
    save_with_stock_image_processor,
)

_MODELING = "transformers.models.gemma3.modeling_gemma3"

TINY_IMAGE_SIZE = 224
TINY_PATCH = 14
TINY_TOKENS_PER_IMAGE = 64
TINY_WINDOW = 24

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
"""Gemma's first ids, in the real tokenizer's order."""
CHAT_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
"""Gemma 3's chat and image tokens (the tiny tokenizer appends them after its learned pieces)."""
NAMED_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
"""The tokenizer attributes ``Gemma3Processor`` reads (``tokenizer.boi_token`` ...)."""

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
"""Gemma 3's chat format: ``<bos>``, turns ``<start_of_turn>{user|model}\\n ... <end_of_turn>\\n``, a system message
written at the start of the first user turn, ``<start_of_image>`` where an image goes."""


class Gemma3Family(VLMFamily):
    """Gemma 3: SigLIP + pooled projector (one square grid per image), sliding-window and full-attention layers,
    bidirectional attention inside each image."""

    name = "gemma3"
    model_type = "gemma3"
    label = "Gemma 3"
    tiny_alias = "tiny-gemma3"
    input_keys = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")
    image_input_keys = ("pixel_values",)
    pixel_bounds = False
    stock_processor = "Gemma3Processor"
    end_of_turn = "<end_of_turn>"
    # 0 = text: 1 marks the soft image tokens, among which the model's mask is bidirectional.
    token_inputs = {"token_type_ids": 0}
    nested_images = True

    # -- classes -----------------------------------------------------------------------------------------------------
    def model_class(self) -> type:
        import transformers

        return transformers.Gemma3ForConditionalGeneration

    def fsdp_wrap_classes(self, vision_blocks: bool) -> set[type]:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer
        from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

        return {Gemma3DecoderLayer, SiglipEncoderLayer} if vision_blocks else {Gemma3DecoderLayer}

    def eager_attention(self) -> Callable[..., Any]:
        import importlib

        return importlib.import_module(_MODELING).eager_attention_forward

    def attention_layers(self, text_config: Any) -> list[int]:
        """The ``full_attention`` entries of ``text_config.layer_types``: a sliding-window layer can hide an image
        from a query far after it (its attention over the visual tokens is then undefined)."""
        return [i for i, kind in enumerate(text_config.layer_types) if kind == "full_attention"]

    # -- chat and processor facts --------------------------------------------------------------------------------
    def grid_token_id(self, processor: Any) -> int:
        """``<image_soft_token>``: the processor's ``image_token_id`` is the ``<start_of_image>`` placeholder."""
        tok = processor.tokenizer
        return int(tok.convert_tokens_to_ids(tok.image_token))

    def tiny_tokenizer(self) -> Any:
        return build_tiny_tokenizer()

    # -- processors ----------------------------------------------------------------------------------------------
    def make_tiny_processor(self, min_pixels: int, max_pixels: int) -> Any:
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        image_processor = Gemma3ImageProcessorPil(
            size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=2,
            do_pan_and_scan=False,
        )
        return Gemma3Processor(
            image_processor, build_tiny_tokenizer(), chat_template=CHAT_TEMPLATE, image_seq_length=TINY_TOKENS_PER_IMAGE
        )

    def read_processor(self, source: str, min_pixels: int, max_pixels: int) -> Any:
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        processor_dict, tokenizer, chat_template = read_chat_parts(Gemma3Processor, source)
        return Gemma3Processor(
            Gemma3ImageProcessorPil.from_pretrained(source),
            tokenizer,
            chat_template=chat_template,
            image_seq_length=int(processor_dict.get("image_seq_length", 256)),
        )

    def check_pair(self, model: Any, processor: Any, source: str) -> None:
        cfg, ip, tok = model.config, processor.image_processor, processor.tokenizer
        pairs = {
            "image_token_id / grid token": (cfg.image_token_id, self.grid_token_id(processor)),
            "boi_token_id / <start_of_image>": (cfg.boi_token_id, tok.convert_tokens_to_ids(tok.boi_token)),
            "mm_tokens_per_image / image_seq_length": (cfg.mm_tokens_per_image, processor.image_seq_length),
            "image_size": (cfg.vision_config.image_size, ip.size["height"]),
            "image_size (width)": (cfg.vision_config.image_size, ip.size["width"]),
        }
        refuse_mismatch(pairs, source)
        if getattr(ip, "do_pan_and_scan", None):
            raise ValueError(
                f"processor of {source!r} has do_pan_and_scan on: klal supports Gemma 3 with one view per image "
                "(set do_pan_and_scan to false in its preprocessor_config.json)"
            )

    def save_stock_processor(self, processor: Any, out: str) -> None:
        """``processor.save_pretrained`` with the stock image-processor type in ``processor_config.json``."""
        save_with_stock_image_processor(processor, out, "Gemma3ImageProcessor", self.stock_processor)

    # -- tiny model ----------------------------------------------------------------------------------------------
    def tiny_config(self, tokenizer: Any, **overrides: Any) -> Any:
        """The tiny config: a 2-layer 224-px SigLIP tower pooled to 8 x 8 tokens, four language layers (sliding,
        full, sliding, full) with a 24-token window.

        ``overrides`` are text-config fields by name, vision fields with a ``vision_`` prefix, whole ``text_config``
        / ``vision_config`` dicts, or ``mm_tokens_per_image``.

        Raises:
            ValueError: an unknown override.
        """
        from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

        text: dict[str, Any] = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": TINY_WINDOW,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
        }
        vision: dict[str, Any] = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": TINY_PATCH,
            "vision_use_head": False,
        }
        special = {"mm_tokens_per_image": TINY_TOKENS_PER_IMAGE}
        fields = (set(Gemma3TextConfig().to_dict()), set(SiglipVisionConfig().to_dict()) | {"vision_use_head"})
        apply_tiny_overrides(text, vision, overrides, fields, self.label, special)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*SPECIAL_TOKENS, *CHAT_TOKENS)}
        text.update(
            vocab_size=len(tokenizer), pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"]
        )
        return Gemma3Config(
            text_config=Gemma3TextConfig(**text).to_dict(),
            vision_config={**SiglipVisionConfig(**vision).to_dict(), "model_type": "siglip_vision_model"},
            mm_tokens_per_image=special["mm_tokens_per_image"],
            boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"],
        )

    # -- geometry ------------------------------------------------------------------------------------------------
    def processor_grids(self, processor: Any, height: int, width: int) -> list[Grid]:
        """``[(s, s)]``, ``s = sqrt(image_seq_length)``: every image is squashed to the tower's square size."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got height={height}, width={width}")
        side = math.isqrt(int(processor.image_seq_length))
        return [(side, side)]

    def image_token_count(self, processor: Any, height: int, width: int) -> int:
        """The tokens the ``<start_of_image>`` placeholder becomes: the grid's soft tokens, the image's begin and end
        tokens and the blank lines around them."""
        self.processor_grids(processor, height, width)
        return len(processor.tokenizer(processor.full_image_sequence, add_special_tokens=False)["input_ids"])

    def image_grids(self, processor: Any, enc: Mapping[str, Any], num_images: int) -> list[list[Grid]]:
        if not num_images:
            return []
        n = len(np.asarray(enc["pixel_values"]))
        if n != num_images:
            raise RuntimeError(f"the processor returned {n} image views for {num_images} images (pan-and-scan on?)")
        side = math.isqrt(int(processor.image_seq_length))
        return [[(side, side)] for _ in range(num_images)]


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Gemma-style pieces: special tokens, the 256 byte-fallback tokens, the corpus's characters, BPE merges learned
    over ``▁``-prefixed words of klal's tiny corpus, then the chat and image tokens."""
    from klal.models.qwen2_vl.tiny import TINY_CORPUS, learn_bpe_merges

    words: Counter[str] = Counter()
    for line in TINY_CORPUS.strip().splitlines():
        words.update("▁" + w for w in line.split(" ") if w)
    merges = learn_bpe_merges(words, 384)
    pieces = [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), *sorted({c for w in words for c in w})]
    pieces += [a + b for a, b in merges]
    tokens = list(dict.fromkeys(pieces)) + list(CHAT_TOKENS)
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tiny_tokenizer() -> Any:
    """The tiny Gemma 3 tokenizer: :class:`transformers.GemmaTokenizer` (byte-fallback BPE, spaces as ``▁``) over a
    vocabulary learned offline from klal's tiny corpus, with Gemma's special, chat and image tokens and chat template.

    Deterministic; ``add_bos_token`` is off because the chat template writes ``<bos>`` (klal tokenises rendered
    prompts without added special tokens, as for every family).
    """
    from transformers import GemmaTokenizer

    vocab, merges = _tiny_vocab_and_merges()
    tok = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={**NAMED_TOKENS, "sot_token": "<start_of_turn>", "eot_token": "<end_of_turn>"},
        add_bos_token=False,
        model_max_length=8192,
    )
    tok.chat_template = CHAT_TEMPLATE
    for t in (*SPECIAL_TOKENS, *CHAT_TOKENS):
        if tok.convert_tokens_to_ids(t) != vocab[t]:
            raise RuntimeError(f"tiny Gemma 3 tokenizer: special token {t} got id {tok.convert_tokens_to_ids(t)}")
    return tok


FAMILY = register_family(Gemma3Family())
