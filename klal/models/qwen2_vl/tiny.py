"""What the tiny models of the Qwen-VL line share: the offline tokenizer, the chat template, the text sizes and the
mrope split.

Tokenizer: a byte-level BPE (the real Qwen2 pre-tokenizer and byte alphabet, so any text round-trips) whose merges are
learned deterministically from a small built-in English/question corpus, followed by the Qwen2 special tokens in their
real order, wrapped as :class:`transformers.Qwen2Tokenizer` with a chat template that renders the Qwen2.5-VL format
(default system prompt, ``<|vision_start|><|image_pad|><|vision_end|>`` per image, ``<|im_start|>assistant`` prompt).

Every member's family (:mod:`klal.models.qwen2_vl.family`) and the embedded ``tiny`` Qwen2.5-VL
(:mod:`klal.models.qwen2_5_vl.tiny`) build on this module; it imports nothing of klal.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

from tokenizers import Regex, pre_tokenizers
from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "QWEN2_SPECIAL_TOKENS",
    "TINY_TEXT_DEFAULTS",
    "build_tiny_tokenizer",
    "default_mrope_section",
]

# The Qwen2 special tokens, in the order (and so with the relative ids) of the real tokenizer.
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Renders the Qwen2.5-VL chat format. Newlines are emitted from string expressions so that Jinja's whitespace control
# (``-``) can keep the template readable without leaking indentation into the prompt.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen2's pre-tokenisation split (contractions, letter runs, single digits, punctuation runs, whitespace), written from
# the tokenizer's documented behaviour.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Fixed corpus the BPE merges are learned from, by every family's tiny tokenizer (Qwen's here, Gemma 3's pieces): the
# kinds of prompts and answers klal's tasks use, so prompts stay short. Changing it changes the tiny vocabulary (and so
# every tiny model), so treat it as frozen.
TINY_CORPUS = """
Which cell contains the red star? Answer as (row, column), counting from 1 at the top-left cell.
In which grid cell is the blue circle? Give (row, column); rows are numbered from the top and columns from the left.
Find the green triangle in the grid. Which cell is it in? Reply as (row, column), where the top-left cell is (1, 1).
Where is the yellow square? Answer with the cell as (row, column), 1-based from the top-left corner.
Where do the two lines intersect? Answer with the point as (x, y) in pixels of the image.
Follow the line that starts at the left edge. Where does it end? Answer with the number of the end point.
Point to the person holding the umbrella. Answer with the coordinates of the point.
What is the color of the car on the right side of the image? The car is red.
How many people are standing next to the table? There are three people.
Which object is closest to the camera? The object closest to the camera is the chair.
Describe the region of the image that shows the dog. The dog is lying on the grass near the tree.
Is there a cat on the sofa? Yes, there is a cat on the sofa. No, there is no cat in the picture.
Please look at the picture and answer the question with a single word or phrase.
Write a general description of the image. The image shows a street with cars, trees and buildings.
What text is written on the sign? The sign says stop. What is the number on the shirt?
Answer the question using a single word. Answer: yes. Answer: no. Answer: left. Answer: right.
The answer is (2, 3). The answer is (4, 1). The answer is (1, 5). The point is at (120, 64).
the first row, the second column, the third line, the top, the bottom, the middle, the center of the image.
red, green, blue, yellow, orange, purple, black, white, gray, brown, pink; circle, square, triangle, star, cross.
You are a helpful assistant. The user asks a question about an image and the assistant answers it.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 32 48 64 100 128 224 256 448 512 1000
Which cell contains the star? Which cell contains the circle? Which object contains the answer to the question?
Count the cells in each row and each column of the grid, then answer with the row and the column of the cell.
Where does the line that starts at the marked point end? Trace the line from the start point to its end point.
Which of the lines crosses the other line? The two lines cross each other at one point in the image.
Point to the object in the image that answers the question, and give the point as (x, y) coordinates.
What is the person on the left holding? The person on the left is holding a cup of coffee in the right hand.
Look at the image carefully and answer the question about the objects, their colors and their positions.
"""

_NUM_MERGES = 384

# Text sizes of the tiny models (Qwen2.5-VL's; the other members drop its sliding-window fields).
# head_dim = hidden_size / num_attention_heads = 16, so mrope_section sums to 8.
TINY_TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "use_sliding_window": False,
    "max_window_layers": 4,
    "attention_dropout": 0.0,
}


# -- tokenizer ---------------------------------------------------------------------------------------------------------
def _byte_alphabet() -> list[str]:
    """The byte-level BPE alphabet: byte value ``b`` -> the printable character that stands for it.

    Printable Latin-1 bytes stand for themselves; the remaining bytes (controls, space, a few Latin-1 gaps) are shifted
    to code points from 256 upwards, in byte order, so every byte gets a visible, unique character.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, shifted = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def learn_bpe_merges(word_counts: Counter[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair), stopping at count < 2."""
    words = [(list(w), c) for w, c in sorted(word_counts.items())]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merges.append((a, b))
        merged = a + b
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == a and symbols[i + 1] == b:
                    symbols[i : i + 2] = [merged]
                i += 1
    return merges


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    pre = _pre_tokenizer()
    counts: Counter[str] = Counter()
    for line in TINY_CORPUS.strip().splitlines():
        counts.update(piece for piece, _ in pre.pre_tokenize_str(line))
    merges = learn_bpe_merges(counts, _NUM_MERGES)
    # Two merges can spell the same string ("ab"+"c", "a"+"bc"); the token gets one id, both merges stay.
    tokens = list(dict.fromkeys(_byte_alphabet() + [a + b for a, b in merges]))
    tokens += list(QWEN2_SPECIAL_TOKENS)
    return tuple((t, i) for i, t in enumerate(tokens)), tuple(merges)


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The tiny model's tokenizer: byte-level BPE (bytes + learned merges) plus the Qwen2 special tokens.

    Deterministic: the same ids on every call and machine. Special-token attributes follow the Qwen2.5-VL Instruct
    tokenizer (``eos`` = ``<|im_end|>``, ``pad`` = ``<|endoftext|>``, no ``bos``), and ``chat_template`` renders the
    Qwen2.5-VL chat format.
    """
    vocab, merges = _vocab_and_merges()
    tok = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN2_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    expected = dict(vocab)
    for t in QWEN2_SPECIAL_TOKENS:
        if tok.convert_tokens_to_ids(t) != expected[t]:
            raise RuntimeError(f"tiny tokenizer: special token {t} got id {tok.convert_tokens_to_ids(t)}")
    return tok


# -- rotary ------------------------------------------------------------------------------------------------------------
def default_mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim / 2`` rotary frequencies over (temporal, height, width) in the real models' 1/4, 3/8, 3/8 ratio.

    Qwen2.5-VL 3B/7B use ``[16, 24, 24]`` for ``head_dim = 128``; the tiny ``head_dim = 16`` gives ``[2, 3, 3]``.
    """
    half = head_dim // 2
    if head_dim % 2 or half < 3:
        raise ValueError(f"head_dim must be even and >= 6 for 3-D mrope, got {head_dim}")
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]
