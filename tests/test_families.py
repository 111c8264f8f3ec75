"""Every model family through the one seam (:mod:`klal.models.family`): capture equals eager attention on the
supervised rows, three KLAL training steps, every grounding method, greedy decoding, export, and the rule that no
family's names leave ``klal/models/``.

Each registered family runs on its tiny random model built offline from the real transformers classes (every alias
of :data:`klal.models.family.TINY_ALIASES`).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from klal.capture import CaptureRequest, enable_capture, select_queries
from klal.data.collate import KLALCollator
from klal.models.config import ModelConfig
from klal.models.family import FAMILY_MODULES, TINY_ALIASES, family_for_type, family_of, nest_grids
from klal.models.loader import load_model_and_processor, set_text_attn_implementation
from tests.conftest import HANG_S

ALIASES = sorted(TINY_ALIASES)
ROOT = Path(__file__).resolve().parents[1]


def rows(n: int = 2) -> list[dict]:
    """Rows with images of different sizes and aspect ratios (different grids, padding in the batch)."""
    rng = np.random.RandomState(0)
    sizes = [(100, 150), (224, 224), (60, 200)][:n]
    return [
        {
            "id": f"r{i}",
            "image": Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")),
            "question": "Where is the red star?" if i % 2 == 0 else "Which cell?",
            "answer": "(1, 2)" if i % 2 == 0 else "yes",
            "evidence": {"boxes": [[10.0, 10.0, 40.0, 50.0]], "points": [], "polylines": []},
        }
        for i, (h, w) in enumerate(sizes)
    ]


@pytest.fixture(scope="module", params=ALIASES)
def loaded(request):
    model, processor = load_model_and_processor(ModelConfig(request.param))
    return request.param, model, processor


def test_every_alias_names_its_family_and_the_real_class(loaded):
    alias, model, processor = loaded
    family = family_of(model)
    assert family.tiny_alias == alias and isinstance(model, family.model_class())
    assert model.config.model_type == family.model_type
    assert processor.klal_model_type == family.model_type


def test_capture_equals_eager_attention_on_the_supervised_rows(loaded):
    """The capture's rows (softmax over the visual keys) against eager ``output_attentions`` renormalised over the
    same keys per head, then head-averaged, for every layer with softmax attention (the supervised full-attention
    layers and Gemma 3's sliding-window ones), at 1e-6. Where a sliding window hides every visual key from a query,
    eager's renormalised row is undefined and the capture's is uniform."""
    alias, model, processor = loaded
    family = family_of(model)
    batch = KLALCollator(processor)(rows(3))
    inputs = {k: batch[k] for k in family.input_keys if k in batch}
    grids = nest_grids(batch["grids"], batch["grid_image"])
    visual = family.visual_token_mask(batch["input_ids"], family.grid_token_id(processor), grids)
    # The visual keys are exactly the grids' cells (LLaVA-OneVision's row ends are image tokens but not cells).
    assert visual.sum(1).tolist() == [sum(r * c for r, c in g) for g in batch["grids"]]
    queries = select_queries(batch["answer_mask"], "all")
    set_text_attn_implementation(model, "eager")
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True, use_cache=False).attentions
    layers = family.attention_layers(model.config.text_config)
    if len(eager) == model.config.text_config.num_hidden_layers:
        softmax_layers = [i for i, a in enumerate(eager) if a is not None]
    else:  # Qwen3.5 reports its softmax (full-attention) layers only
        softmax_layers = layers
    eager = [a for a in eager if a is not None]
    assert set(layers) <= set(softmax_layers) and len(eager) == len(softmax_layers), (layers, softmax_layers)
    enable_capture(model, base="eager")
    req = CaptureRequest.from_masks(queries, visual, None)
    with torch.no_grad():
        model(**inputs, klal_capture=req, use_cache=False)
    captured = req.stacked().exp()  # (L, B, A, V)
    req.clear()
    set_text_attn_implementation(model, "sdpa")
    checked, hidden, partly = 0, 0, 0
    for li, att in enumerate(eager):
        for b in range(att.shape[0]):
            keys = visual[b].nonzero().flatten()
            for a, q in enumerate(queries[b].nonzero().flatten()):
                rows_h = att[b, :, q, keys].double()  # (H, V_b)
                got = captured[li, b, a, : len(keys)].double()
                if len(keys) and not rows_h.sum(-1).gt(0).all():
                    # A sliding window hides the whole image from this query (every head): uniform by definition.
                    assert not rows_h.any() and torch.allclose(got, torch.full_like(got, 1 / len(keys))), (alias, li)
                    hidden += 1
                    continue
                partly += bool((rows_h == 0).all(0).any())  # some visual key hidden from this query
                want = (rows_h / rows_h.sum(-1, keepdim=True)).mean(0)
                assert torch.allclose(got, want, atol=1e-6), (alias, li, b, a, (got - want).abs().max())
                checked += 1
    assert checked + hidden == len(softmax_layers) * int(queries.sum())
    if family.attention_layers(model.config.text_config) != softmax_layers:  # Gemma 3: windows that bite
        sliding = model.config.text_config.sliding_window
        assert partly and sliding < batch["input_ids"].shape[1], (alias, partly, hidden)


def test_three_klal_steps_train_every_lora_weight(loaded, tmp_path):
    """Three optimizer steps of NTP + KLAL through the real Lightning Trainer: every loss part finite, every trainable
    parameter gets a gradient, the LoRA weights move and the attention on the target changes."""
    import lightning as L
    from torch.utils.data import DataLoader

    from klal.models.lora import LoraSettings
    from klal.module import KLALModule, OptimSettings

    alias, _, _ = loaded
    module = KLALModule(
        backbone=ModelConfig(alias), lora=LoraSettings(r=4, alpha=8), optim=OptimSettings(lr=5e-3, warmup_steps=0)
    )
    module.configure_model()
    batch = KLALCollator(module.processor)(rows(2))
    parts = module.compute_losses(batch)
    assert {"loss", "ntp", "klal", "target_mass"} <= set(parts) and all(torch.isfinite(parts[k]) for k in parts)
    parts["loss"].backward()
    trainable = [(n, p) for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)
    module.model.zero_grad()
    before = {n: p.detach().clone() for n, p in trainable}
    loader = DataLoader(rows(2), batch_size=2, collate_fn=KLALCollator(module.processor))
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    moved = [n for n, p in module.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved, f"{alias}: no LoRA weight changed in three steps"
    after = module.compute_losses(batch)
    assert torch.isfinite(after["loss"]) and float(after["klal"]) != pytest.approx(float(parts["klal"]), abs=1e-7)


def test_every_grounding_method_gives_maps_on_the_model_grids(loaded):
    from klal.grounding import available_methods, build_method
    from klal.session import GroundingModel

    alias, model, processor = loaded
    gm = GroundingModel(model, processor)
    row = rows(2)[1]  # 224 x 224: large enough for every method's minimum crop
    inputs = gm.inputs([row["image"]], row["question"])
    fast = {
        "entropy_gradient": {"max_rounds": 1},
        "localization_heads": {"top_k": 2, "discover_samples": 2, "floor": 0.0},
    }
    for name in available_methods():
        method = build_method(name, **fast.get(name, {}))
        method.prepare(gm, [row, row])
        result = method.run(gm, row)
        assert [m.shape for m in result.maps] == [tuple(g) for g in inputs["grids"]], (alias, name)
        assert all(np.isfinite(m).all() and (m >= 0).all() for m in result.maps), (alias, name)


def test_greedy_decoding_equals_an_argmax_loop_without_cache(loaded):
    """The cached decoder (family positions for prompt and steps) gives the tokens of a plain loop that re-reads the
    whole sequence each step (the model numbers the positions itself) and takes the argmax."""
    from klal.decode import greedy_generate
    from klal.session import GroundingModel

    alias, model, processor = loaded
    gm = GroundingModel(model, processor)
    row = rows(1)[0]
    inputs = gm.inputs([row["image"]], row["question"])
    kw = {k: inputs[k] for k in gm.family.input_keys if k in inputs}
    got = greedy_generate(model, kw, 6, eos_token_ids=[-1])[0]
    ids, mask = kw["input_ids"], kw["attention_mask"]
    want: list[int] = []
    with torch.no_grad():
        for _ in range(6):
            logits = model(**{**kw, "input_ids": ids, "attention_mask": mask}, use_cache=False).logits[0, -1]
            nxt = int(logits.argmax())
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
            for key, fill in gm.family.token_inputs.items():
                kw[key] = torch.nn.functional.pad(kw[key], (0, 1), value=fill)
    assert got == want, alias


@pytest.mark.slow
def test_export_merge_reloads_with_the_stock_auto_classes(loaded, tmp_path):
    """Train an adapter, export it merged, and reload the folder with ``AutoModelForImageTextToText`` (and
    ``AutoProcessor`` where torchvision is installed: the stock video processors need it); the reloaded model gives
    the merged model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from klal.checkpoint.adapter import save_adapter
    from klal.export import export
    from klal.models.lora import LoraSettings, apply_lora

    alias, _, processor = loaded
    base, _ = load_model_and_processor(ModelConfig(alias))
    peft_model = apply_lora(base, LoraSettings(r=2, alpha=4))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    adapter = tmp_path / "adapter"
    save_adapter(peft_model, str(adapter), ModelConfig(alias), LoraSettings(r=2, alpha=4))
    out = export(adapter=str(adapter), out=str(tmp_path / "merged"), merge=True)
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(reloaded) is family_of(base).model_class()
    batch = KLALCollator(processor)(rows(1))
    inputs = {k: batch[k] for k in family_of(base).input_keys if k in batch}
    fresh, _ = load_model_and_processor(ModelConfig(alias))
    merged = PeftModel.from_pretrained(fresh, str(adapter)).merge_and_unload().eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, merged(**inputs).logits, atol=1e-5)
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import AutoProcessor

        stock = AutoProcessor.from_pretrained(out)
        assert stock.image_token_id == processor.image_token_id


# Geometry constants the family seam replaced (one family's numbers, once global); no family defines them now.
RETIRED_CONSTANTS = ("TOKEN_PX", "PATCH_PX", "MERGE")


def _family_definitions() -> tuple[set[str], set[str]]:
    """From the registry (:data:`FAMILY_MODULES`), so a new family is covered as soon as it is registered: the
    transformers class prefix of each family (``Qwen2_5_VL`` of ``Qwen2_5_VLForConditionalGeneration``) with its
    modules' dotted path (``qwen2_5_vl.``), and every class and upper-case constant its folder under ``klal/models/``
    defines (private ones included), with the family and model class names."""
    words, prefixes = set(RETIRED_CONSTANTS), set()
    for model_type, module in FAMILY_MODULES.items():
        family = family_for_type(model_type)
        prefixes.add(family.model_class().__name__.removesuffix("ForConditionalGeneration"))
        prefixes.add(re.escape(f"{model_type}."))
        words.update({type(family).__name__, family.model_class().__name__})
        for path in (ROOT / Path(*module.split("."))).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef):
                    words.add(node.name)
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                words.update(t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper() and t.id != "FAMILY")
    return words, prefixes


def family_names() -> re.Pattern:
    """What no file outside ``klal/models/`` may name (:func:`_family_definitions`)."""
    words, prefixes = _family_definitions()
    return re.compile("|".join(sorted(prefixes)) + "|" + "|".join(rf"\b{w}\b" for w in sorted(words)))


def test_family_names_cover_every_registered_family():
    """The pattern is derived, not listed: it names each registered family's model class and its folder's constants."""
    pattern = family_names()
    for model_type in FAMILY_MODULES:
        family = family_for_type(model_type)
        assert pattern.search(family.model_class().__name__) and pattern.search(type(family).__name__)
    assert pattern.search("from klal.models.qwen2_5_vl.tiny import CHAT_TEMPLATE")
    assert not pattern.search("family.model_class()") and not pattern.search("klal.models.family.FAMILY_MODULES")


def test_no_family_class_or_constant_outside_klal_models():
    """The seam holds: family classes and constants (:func:`family_names`) are named only inside ``klal/models/``."""
    pattern = family_names()
    offenders = []
    for path in sorted((ROOT / "klal").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("klal/models/"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.slow
def test_train_py_runs_the_demo_config_on_another_family(tmp_path):
    """The issue's own command line: the demo config with ``--model.name_or_path tiny-qwen3-vl`` (the spelling
    evaluate.py uses, written out to ``--model.backbone.name_or_path``) trains and writes its adapter."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--model.name_or_path",
        "tiny-qwen3-vl",
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        "--data.generate.out",
        str(tmp_path / "data"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    configs = list(tmp_path.rglob("config.yaml"))
    assert configs and "tiny-qwen3-vl" in configs[0].read_text()
    assert list(tmp_path.rglob("adapter_model.safetensors"))


SEAM_SCOPE = ("klal", "train.py", "evaluate.py", "data_gen")
"""Where no family's chat token, class or constant may be written: the library outside ``klal/models/`` and the
scripts users run."""


def _seam_files() -> list[tuple[str, Path]]:
    files = []
    for part in SEAM_SCOPE:
        path = ROOT / part
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            rel = f.relative_to(ROOT).as_posix()
            if not rel.startswith("klal/models/"):
                files.append((rel, f))
    return files


def _family_facts() -> tuple[set[str], set[str]]:
    """From the registry: every family's chat and special tokens (its tiny tokenizer's, its end-of-turn token) and the
    public names of :func:`_family_definitions` (a private one may be reused by another module for its own value)."""
    tokens = set()
    for model_type in FAMILY_MODULES:
        family = family_for_type(model_type)
        tokens.add(family.end_of_turn)
        tokens.update(family.tiny_tokenizer().all_special_tokens)
    words, _ = _family_definitions()
    return tokens, {w for w in words if not w.startswith("_")}


def _code_strings(tree) -> list[tuple[int, str]]:
    """Every string literal of a module that is not a docstring (docs may name a family's token as an example)."""
    import ast

    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_no_chat_token_or_family_name_in_code_outside_klal_models():
    """The chat facts sit behind the seam: no code in klal/ (outside ``klal/models/``), train.py, evaluate.py or
    data_gen/ writes a family's chat or special token (``<|im_end|>``, ``<end_of_turn>``, ``<image>`` ...), or names a
    family's class or module constant. Tokens and names come from the registry, so a new family is covered as soon as
    it is registered. Allowed: docstrings and comments (they may name a token as an example), and the generic
    ``<unk>`` / ``<pad>`` ... tokens that are no chat fact (none of them occurs in code today either)."""
    import ast

    tokens, names = _family_facts()
    assert "<|im_end|>" in tokens and "<end_of_turn>" in tokens and "<image>" in tokens  # the facts were read
    assert {"Gemma3Family", "Gemma3ForConditionalGeneration", "QWEN2_SPECIAL_TOKENS"} <= names
    name_re = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names))) + r")\b")
    offenders = []
    for rel, path in _seam_files():
        tree = ast.parse(path.read_text())
        for line, value in _code_strings(tree):
            offenders += [f"{rel}:{line}: string {value!r} holds {t!r}" for t in sorted(tokens) if t in value]
        for node in ast.walk(tree):
            ident = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    if name_re.search(alias.name):
                        offenders.append(f"{rel}:{node.lineno}: imports {alias.name}")
            elif ident is not None and name_re.fullmatch(ident):
                offenders.append(f"{rel}:{node.lineno}: names {ident}")
    assert not offenders, "\n".join(offenders)


def test_the_seam_test_catches_what_it_forbids():
    """The checker itself: code that writes ``<|im_end|>`` or names a family constant is reported, a docstring
    that mentions the token is not."""
    import ast

    tokens, names = _family_facts()
    src = '"""Ends at <|im_end|>."""\nEND = "<|im_end|>"\nfrom klal.models.gemma3 import CHAT_TOKENS\n'
    strings = _code_strings(ast.parse(src))
    assert [v for _, v in strings if any(t in v for t in tokens)] == ["<|im_end|>"]
    assert "CHAT_TOKENS" in names
