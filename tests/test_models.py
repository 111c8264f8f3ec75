"""The tiny Qwen2.5-VL, the checkpoint loader and language-model-only LoRA."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import AttentionInterface, Qwen2_5_VLProcessor
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from klal.models.loader import ModelConfig, load_model_and_processor, load_processor, set_text_attn_implementation
from klal.models.lora import LoraSettings, apply_lora, language_lora_regex, trainable_parameter_summary
from klal.models.qwen2_5_vl.tiny import build_tiny_model, build_tiny_processor, build_tiny_tokenizer, tiny_config
from klal.models.qwen2_vl.tiny import QWEN2_SPECIAL_TOKENS, _byte_alphabet, learn_bpe_merges

torch.set_num_threads(2)


def _noise(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _prompt(processor, n_images: int = 1, question: str = "Which cell contains the red star?") -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _batch(processor, sizes: list[tuple[int, int]]):
    """One prompt per image; sizes are (height, width)."""
    images = [_noise(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    texts = [_prompt(processor, question=f"Question number {i}?" + " more" * i) for i in range(len(images))]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


# -- tokenizer ---------------------------------------------------------------------------------------------------------
def test_learn_merges_hand_worked():
    # Pair counts: (a,a)=2*2, (a,b)=2+3 -> merge (a,b); then (a,a)=2 ties (a,ab)=2 -> smaller pair (a,a); then (aa,ab).
    assert learn_bpe_merges(Counter({"aaab": 2, "ab": 3}), 10) == [("a", "b"), ("a", "a"), ("aa", "ab")]
    # Pairs seen once are never merged.
    assert learn_bpe_merges(Counter({"xyz": 1}), 10) == []


def test_byte_alphabet_is_the_byte_level_alphabet():
    chars = _byte_alphabet()
    assert len(chars) == 256 and len(set(chars)) == 256
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    # Space and newline are the well-known shifted characters; printable ASCII maps to itself.
    assert chars[ord(" ")] == "\u0120" and chars[ord("\n")] == "\u010a" and chars[ord("A")] == "A"


def test_tokenizer_is_deterministic_and_round_trips():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "Which cell contains the red star? Ünïcødé 中文 ✓ tabs\tand\nnewlines (3, 4)."
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert ids == b(text, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == text
    # The learned merges shorten ordinary prompt text well below one token per byte.
    prompt = "Which cell contains the red star? Answer as (row, column), counting from 1 at the top-left cell."
    assert len(a(prompt, add_special_tokens=False)["input_ids"]) < len(prompt.encode()) / 3


def test_tokenizer_special_tokens():
    tok = build_tiny_tokenizer()
    n = len(tok)
    # Special tokens close the vocabulary in the real Qwen2 order, and each encodes to exactly its own id.
    expected = {t: n - len(QWEN2_SPECIAL_TOKENS) + i for i, t in enumerate(QWEN2_SPECIAL_TOKENS)}
    for t, i in expected.items():
        assert tok.convert_tokens_to_ids(t) == i
        assert tok(t, add_special_tokens=False)["input_ids"] == [i]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    # No BOS/EOS is added around plain text (Qwen2 behaviour).
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]
    assert tok.decode(tok("x<|im_end|>")["input_ids"], skip_special_tokens=True) == "x"


# -- processor ---------------------------------------------------------------------------------------------------------
def test_chat_template_renders_qwen25vl_format(processor):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]}
    assert processor.apply_chat_template([user], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    chat = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert processor.apply_chat_template(chat) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
    )
    two = {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}
    assert processor.apply_chat_template([two], add_vision_id=True).endswith(
        "user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Same?<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("height", "width", "grid", "n_tokens"),
    [
        (224, 224, (16, 16), 64),  # already a multiple of 28
        (448, 448, (32, 32), 256),  # exactly max_pixels
        (300, 500, (22, 36), 198),  # rounded to 308 x 504
        # 896 x 588 > max_pixels: scaled by sqrt(540000 / 200704), floored to multiples of 28 -> 364 x 532
        (600, 900, (26, 38), 247),
        (20, 20, (4, 4), 4),  # below min_pixels: scaled up to 56 x 56
    ],
)
def test_processor_geometry_and_outputs(processor, height, width, grid, n_tokens):
    enc = processor(text=[_prompt(processor)], images=[_noise(height, width)], return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    assert enc["image_grid_thw"].tolist() == [[1, *grid]]
    assert enc["pixel_values"].shape == (grid[0] * grid[1], 3 * 2 * 14 * 14)
    ids = enc["input_ids"][0]
    is_image = ids == processor.image_token_id
    assert int(is_image.sum()) == n_tokens
    # mm_token_type_ids marks exactly the image placeholders with 1.
    assert torch.equal(enc["mm_token_type_ids"][0], is_image.long())
    # The placeholders sit contiguously between <|vision_start|> and <|vision_end|>.
    tok = processor.tokenizer
    start = int((ids == tok.convert_tokens_to_ids("<|vision_start|>")).nonzero())
    end = int((ids == tok.convert_tokens_to_ids("<|vision_end|>")).nonzero())
    assert end - start - 1 == n_tokens and bool(is_image[start + 1 : end].all())


def test_processor_is_a_qwen25vl_processor_without_videos(processor):
    assert isinstance(processor, Qwen2_5_VLProcessor)
    # DataLoader workers receive the collator (and so the processor) pickled.
    clone = pickle.loads(pickle.dumps(processor))
    assert clone.image_token_id == processor.image_token_id and clone.chat_template == processor.chat_template
    with pytest.raises(ValueError, match="videos"):
        processor(text=["x"], videos=[np.zeros((2, 28, 28, 3), dtype=np.uint8)])


def test_pixel_bounds_are_applied_and_validated():
    small = build_tiny_processor(max_pixels=112 * 112)
    enc = small(text=[_prompt(small)], images=[_noise(448, 448)], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    with pytest.raises(ValueError, match="min_pixels"):
        build_tiny_processor(min_pixels=1000, max_pixels=10)


# -- tiny config and model ---------------------------------------------------------------------------------------------
def test_tiny_config_sizes():
    cfg = tiny_config()
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (64, 4, 4, 2)
    assert t.intermediate_size == 128 and t.rope_parameters["mrope_section"] == [2, 3, 3]
    assert (v.depth, v.hidden_size, v.num_heads, v.out_hidden_size, v.fullatt_block_indexes) == (2, 32, 2, 64, [1])
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (14, 2, 2)
    tok = build_tiny_tokenizer()
    assert t.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert t.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_tiny_config_overrides():
    cfg = tiny_config(hidden_size=128, num_hidden_layers=2, vision_depth=3, vision_fullatt_block_indexes=[0, 2])
    assert cfg.text_config.hidden_size == 128 and cfg.text_config.num_hidden_layers == 2
    # head_dim 32 -> mrope over 16 frequencies in the 1/4, 3/8, 3/8 split; the merger output follows the text width.
    assert cfg.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
    assert cfg.vision_config.depth == 3 and cfg.vision_config.out_hidden_size == 128
    assert tiny_config(vision_config={"hidden_size": 64}).vision_config.hidden_size == 64
    with pytest.raises(ValueError, match="bogus"):
        tiny_config(bogus=1)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_config(vision_patch_size=16)
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_config(mrope_section=[2, 2, 2])
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=3)


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    b, c = build_tiny_model(seed=0), build_tiny_model(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_models_never_share_a_config():
    cfg = tiny_config()
    first = build_tiny_model(cfg, attn_implementation="sdpa")
    second = build_tiny_model(cfg, attn_implementation="eager")
    assert first.config is not cfg and second.config is not first.config
    assert first.config.text_config._attn_implementation == "sdpa"
    assert second.config.text_config._attn_implementation == "eager"
    assert second.config.vision_config._attn_implementation == "sdpa"
    assert cfg.text_config._attn_implementation is None  # the caller's config is untouched


def _captured_positions(model, inputs) -> torch.Tensor:
    """The (3, B, S) position ids the language model's rotary embedding actually receives."""
    seen = {}
    handle = model.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("pos", args[1].clone())
    )
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    return seen["pos"], logits


def test_mm_token_type_ids_gives_3d_mrope_positions(model, processor):
    # 112 x 168 px -> 8 x 12 patches -> a 4 x 6 grid of visual tokens.
    enc = processor(text=[_prompt(processor)], images=[_noise(112, 168)], return_tensors="pt")
    ids = enc["input_ids"][0]
    first = int((ids == processor.image_token_id).nonzero()[0])
    pos, logits = _captured_positions(model, enc)
    t, h, w = pos[:, 0]
    # Text before the image: 0, 1, ... on all three axes.
    assert t[:first].tolist() == h[:first].tolist() == w[:first].tolist() == list(range(first))
    # Visual tokens (row-major 4 x 6): t constant, h = first + row, w = first + column.
    vis = slice(first, first + 24)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    assert t[vis].tolist() == [first] * 24
    assert h[vis].tolist() == (first + rows.reshape(-1)).tolist()
    assert w[vis].tolist() == (first + cols.reshape(-1)).tolist()
    # Text after the image resumes at first + max(4, 6).
    assert t[first + 24] == first + 6

    plain = {k: v for k, v in enc.items() if k != "mm_token_type_ids"}
    pos_1d, logits_1d = _captured_positions(model, plain)
    assert torch.equal(pos_1d[0, 0], torch.arange(ids.numel()))  # silently falls back to 1-D positions
    assert not torch.equal(pos, pos_1d)
    assert not torch.allclose(logits, logits_1d, atol=1e-6)


# -- loader ------------------------------------------------------------------------------------------------------------
def test_load_tiny_defaults():
    model, processor = load_model_and_processor(ModelConfig())
    assert model.dtype == torch.float32 and not model.training
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert dict(processor.image_processor.size)["longest_edge"] == 448 * 448
    assert load_processor(ModelConfig(max_pixels=224 * 224)).image_processor.size["longest_edge"] == 224 * 224
    small, _ = load_model_and_processor(
        ModelConfig(tiny_overrides={"num_hidden_layers": 2}, attn_implementation="eager")
    )
    assert small.config.text_config.num_hidden_layers == 2
    assert small.config.text_config._attn_implementation == "eager"
    assert small.config.vision_config._attn_implementation == "sdpa"


def test_save_and_load_back_gives_identical_logits(tmp_path, processor):
    model, proc = load_model_and_processor(ModelConfig(tiny_seed=3))
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, loaded_proc = load_model_and_processor(ModelConfig(name_or_path=str(tmp_path), dtype="float32"))
    assert isinstance(loaded_proc, Qwen2_5_VLProcessor)
    assert loaded.config.vision_config._attn_implementation == "sdpa"
    batch = _batch(proc, [(224, 224), (140, 280)])
    again = _batch(loaded_proc, [(224, 224), (140, 280)])
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**again).logits)
    # "auto" means bfloat16 for anything that is not the embedded tiny model.
    bf16, _ = load_model_and_processor(ModelConfig(name_or_path=str(tmp_path)))
    assert bf16.dtype == torch.bfloat16


def test_loader_pixel_bounds_override_a_hub_style_preprocessor_config(tmp_path):
    model, proc = load_model_and_processor(ModelConfig())
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    # Hub checkpoints keep the image processor in preprocessor_config.json with min_pixels/max_pixels keys.
    proc_cfg = json.loads((tmp_path / "processor_config.json").read_text())
    image_cfg = proc_cfg.pop("image_processor")
    image_cfg.update(min_pixels=3136, max_pixels=12845056, processor_class="Qwen2_5_VLProcessor")
    image_cfg.pop("size")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    (tmp_path / "processor_config.json").write_text(json.dumps(proc_cfg))
    loaded = load_processor(ModelConfig(name_or_path=str(tmp_path), max_pixels=224 * 224))
    enc = loaded(text=[_prompt(loaded)], images=[_noise(448, 448)], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 16, 16]]


def test_loader_errors(tmp_path):
    missing = str(tmp_path / "no" / "such" / "dir")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_model_and_processor(ModelConfig(name_or_path=missing))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_processor(ModelConfig(name_or_path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="llava"):
        load_model_and_processor(ModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_processor(ModelConfig(dtype="float8"))
    with pytest.raises(ValueError, match="attn_implementation"):
        load_model_and_processor(ModelConfig(attn_implementation="nope"))
    with pytest.raises(ValueError, match="min_pixels"):
        load_processor(ModelConfig(min_pixels=0))


def test_loader_refuses_a_mismatched_processor():
    proc = build_tiny_processor()
    proc.image_processor.merge_size = 1
    with pytest.raises(ValueError, match="merge_size"):
        load_model_and_processor(ModelConfig(), processor=proc)


def _register_wrapped_sdpa(name: str) -> list[int]:
    """Register ``name`` as sdpa plus a call counter (like klal's capture attention does)."""
    calls = [0]
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def fn(*args, **kwargs):
        calls[0] += 1
        return sdpa(*args, **kwargs)

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return calls


def test_set_text_attn_implementation_switches_only_the_text_backbone(processor):
    model = build_tiny_model(seed=2)
    batch = _batch(processor, [(224, 224), (140, 280)])  # padded: the mask must still apply
    with torch.no_grad():
        ref = model(**batch).logits
        set_text_attn_implementation(model, "eager")
        assert model.config.text_config._attn_implementation == "eager"
        assert model.config.vision_config._attn_implementation == "sdpa"
        torch.testing.assert_close(model(**batch).logits, ref, atol=1e-5, rtol=0)

        calls = _register_wrapped_sdpa("klal_test_counting_sdpa")
        set_text_attn_implementation(apply_lora(model, LoraSettings()), "klal_test_counting_sdpa")
        assert model.config.vision_config._attn_implementation == "sdpa"
        out = model(**batch).logits
    # Called once per language layer, never by the vision tower.
    assert calls[0] == model.config.text_config.num_hidden_layers
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a registered"):
        set_text_attn_implementation(model, "does_not_exist")


# -- LoRA --------------------------------------------------------------------------------------------------------------
def test_lora_regex_matches_only_chosen_language_layers():
    rx = re.compile(language_lora_regex("attention_mlp", [1, 3], num_layers=12))
    hits = [
        "model.language_model.layers.1.self_attn.q_proj",
        "base_model.model.model.language_model.layers.3.mlp.down_proj",
        "language_model.layers.1.self_attn.o_proj",
    ]
    misses = [
        "model.visual.blocks.1.mlp.gate_proj",  # vision MLP reuses the names
        "model.visual.blocks.1.attn.qkv",
        "model.language_model.layers.11.self_attn.q_proj",  # 11 is not 1
        "model.language_model.layers.2.self_attn.q_proj",
        "model.language_model.layers.1.self_attn.q_proj.lora_A",
        "model.language_model.layers.1.input_layernorm",
        "model.xlanguage_model.layers.1.self_attn.q_proj",
        "lm_head",
    ]
    assert all(rx.fullmatch(n) for n in hits)
    assert not any(rx.fullmatch(n) for n in misses)
    attn_only = re.compile(language_lora_regex("attention", None, num_layers=2))
    assert attn_only.fullmatch("model.language_model.layers.0.self_attn.v_proj")
    assert not attn_only.fullmatch("model.language_model.layers.0.mlp.up_proj")
    assert re.compile(language_lora_regex(["q_proj", "mlp.up_proj"], [-1], 4)).fullmatch(
        "model.language_model.layers.3.mlp.up_proj"
    )
    with pytest.raises(ValueError, match="qkv"):
        language_lora_regex(["qkv"], None, 4)
    with pytest.raises(ValueError, match="out of range"):
        language_lora_regex("attention", [4], 4)
    with pytest.raises(ValueError, match="nonsense"):
        language_lora_regex("nonsense", None, 4)


_SHAPES = {  # (in, out) of each decoder-layer projection of the tiny model
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (64, 32),
    "self_attn.v_proj": (64, 32),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (64, 128),
    "mlp.up_proj": (64, 128),
    "mlp.down_proj": (128, 64),
}


@pytest.mark.parametrize(
    ("targets", "layers", "want_targets", "want_layers"),
    [
        (
            "attention",
            None,
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
            [0, 1, 2, 3],
        ),
        ("attention_mlp", [1, 3], list(_SHAPES), [1, 3]),
        ("all_linear", [0], list(_SHAPES), [0]),
        (["v_proj", "mlp.down_proj"], [-1], ["self_attn.v_proj", "mlp.down_proj"], [3]),
    ],
)
def test_apply_lora_wraps_exactly_the_chosen_modules(targets, layers, want_targets, want_layers):
    from peft.tuners.lora import LoraLayer

    r = 4
    model = apply_lora(build_tiny_model(), LoraSettings(r=r, alpha=8, dropout=0.0, targets=targets, layers=layers))
    prefix = "base_model.model.model.language_model.layers"
    wanted = {f"{prefix}.{i}.{t}" for i in want_layers for t in want_targets}
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == wanted
    assert not any(".visual." in n for n in wrapped)
    # Vision MLPs (same names as the language MLPs) keep plain Linear layers even when MLP targets are chosen.
    vision_mlp = [
        m
        for n, m in model.named_modules()
        if ".visual.blocks." in n and n.endswith(("gate_proj", "up_proj", "down_proj"))
    ]
    assert len(vision_mlp) == 2 * 3 and all(type(m) is torch.nn.Linear for m in vision_mlp)
    assert not any(isinstance(m, LoraLayer) for n, m in model.named_modules() if ".visual." in n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.lora_{ab}.default.weight" for w in wanted for ab in "AB"}
    expected_count = sum(r * sum(_SHAPES[t]) for t in want_targets) * len(want_layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_count
    summary = trainable_parameter_summary(model)
    assert f"{expected_count:,}" in summary and f"{len(wanted)} modules with LoRA" in summary


def test_lora_gradients_reach_only_adapters(processor):
    model = apply_lora(build_tiny_model().train(), LoraSettings(targets="attention_mlp", dropout=0.0))
    batch = _batch(processor, [(112, 112)])
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif not p.requires_grad:
            assert p.grad is None, name


def test_lora_settings_are_validated():
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(build_tiny_model(), LoraSettings(dropout=1.5))
    with pytest.raises(ValueError, match="r must"):
        apply_lora(build_tiny_model(), LoraSettings(r=0))


def test_saved_adapter_reproduces_logits(tmp_path, processor):
    from peft import PeftModel

    model = apply_lora(build_tiny_model(seed=5), LoraSettings(targets="attention_mlp", layers=[0, 2], dropout=0.0))
    # LoRA B starts at zero (adapter = identity); give it weights so the adapter changes the output.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.eval()
    batch = _batch(processor, [(224, 224), (112, 168)])
    with torch.no_grad():
        adapted = model(**batch).logits
        base_logits = build_tiny_model(seed=5)(**batch).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "adapter")
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(build_tiny_model(seed=5), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, adapted, atol=1e-6, rtol=0)


# -- base parts trained in full next to LoRA (train_extra) ------------------------------------------------------------
def _tied_tiny(tied: bool):
    cfg = tiny_config()
    cfg.tie_word_embeddings = tied
    model = build_tiny_model(cfg)
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied
    return apply_lora(model, LoraSettings(r=2, alpha=4))


@pytest.mark.parametrize("parts", [["lm_head"], ["merger", "lm_head"]], ids=["lm_head", "merger+lm_head"])
def test_train_extra_lm_head_with_tied_embeddings_trains_the_shared_matrix(parts):
    from klal.models.lora import train_base_parts

    model = _tied_tiny(True)
    base = model.get_base_model()
    shared = base.lm_head.weight
    with pytest.warns(UserWarning, match="ties lm_head to embed_tokens"):
        n = train_base_parts(model, parts)
    merger = sum(p.numel() for p in base.model.visual.merger.parameters()) if "merger" in parts else 0
    assert shared.requires_grad and n == shared.numel() + merger
    # The head really trains: its gradient is the sum of the output-head and the input-embedding gradients.
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert shared.grad is not None and shared.grad[ids[0]].abs().sum() > 0


def test_train_extra_lm_head_untied_trains_only_the_head():
    from klal.models.lora import train_base_parts

    model = _tied_tiny(False)
    base = model.get_base_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n = train_base_parts(model, ["merger", "lm_head"])
    merger = sum(p.numel() for p in base.model.visual.merger.parameters())
    assert n == base.lm_head.weight.numel() + merger
    assert base.lm_head.weight.requires_grad and not base.model.language_model.embed_tokens.weight.requires_grad
    with pytest.raises(ValueError, match=r"train_extra \['visual'\] unknown"):
        train_base_parts(model, ["visual"])


# -- base-model identity (klal.models.identity) ------------------------------------------------------------------------
def test_model_names_that_may_be_one_model():
    from klal.models.identity import hub_id_of, same_name

    snapshot = "/home/u/.cache/huggingface/hub/models--Qwen--Qwen2.5-VL-3B-Instruct/snapshots/0123abcd"
    assert hub_id_of(snapshot) == "Qwen/Qwen2.5-VL-3B-Instruct" and hub_id_of("Qwen/X") == "Qwen/X"
    assert same_name("Qwen/Qwen2.5-VL-3B-Instruct", snapshot)
    assert same_name("Qwen/Qwen2.5-VL-3B-Instruct", "/models/Qwen2.5-VL-3B-Instruct")  # a copy under its own name
    assert not same_name("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert not same_name("Qwen/Qwen2.5-VL-7B-Instruct", snapshot)
    assert not same_name("tiny", "/somewhere/tiny") and same_name("tiny", "tiny")


def test_identity_by_content_ignores_dtype_and_name_and_sees_other_weights():
    from klal.checkpoint.compat import base_fingerprint
    from klal.models.identity import base_identity, identity_mismatch

    fp32 = build_tiny_model(seed=0)
    bf16 = build_tiny_model(seed=0, dtype=torch.bfloat16)
    other = build_tiny_model(seed=1)
    a, b = base_identity(fp32, "/copy/one"), base_identity(bf16, "/copy/two")
    assert len(a["weights"]) == 32 and a["architecture"]["hidden_size"] == 64
    assert a["architecture"]["vision_depth"] == 2 and a["architecture"]["model_type"] == "qwen2_5_vl"
    assert identity_mismatch(a, b) == [], "a bfloat16 load of the same weights is the same model"
    assert identity_mismatch(a, base_identity(other, "/copy/one")) == ["weights"]
    # LoRA leaves the sampled weights alone: the wrapped model has the identity of its base.
    wrapped = apply_lora(build_tiny_model(seed=0), LoraSettings(r=2, alpha=4, targets="attention_mlp"))
    assert identity_mismatch(a, base_identity(wrapped, "x")) == []
    # The tiny model's settings are compared too (and named first); tiny never matches a hub model.
    seed0 = base_fingerprint(ModelConfig(tiny_seed=0), fp32)
    seed1 = base_fingerprint(ModelConfig(tiny_seed=1), other)
    assert identity_mismatch(seed0, seed1) == ["tiny_seed"]
    assert identity_mismatch(seed0, {**a, "name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct"}) == ["name_or_path"]
    deeper = build_tiny_model(tiny_config(num_hidden_layers=2))
    assert identity_mismatch(a, base_identity(deeper, "/copy/one")) == ["architecture"]
