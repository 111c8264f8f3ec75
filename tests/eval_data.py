"""Fixtures of the evaluation tests (use with ``pytest_plugins = ["tests.eval_data"]``): tiny datasets of the three
synthetic tasks, a LoRA adapter with non-zero weights, and datasets with text-only rows mixed in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ALL_METHODS = [
    "attention_probe",
    "localization_heads",
    "entropy_gradient",
    "vicrop_rel_att",
    "vicrop_grad_att",
    "laser",
]
MODEL_FLAGS = ["--model.max_pixels", str(224 * 224)]
QUICK_OPTIONS = {
    "attention_probe": {"query": "answer_last"},
    "localization_heads": {"top_k": 3, "floor": 0.0},
    "entropy_gradient": {"max_rounds": 1, "max_new_tokens": 2},
    "vicrop_rel_att": {"max_new_tokens": 2},
    "vicrop_grad_att": {"max_new_tokens": 2},
    "laser": {"max_new_tokens": 2},
}
"""Options that make each method quick on the tiny model (the random model's flat attention needs floor 0)."""


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> dict[str, str]:
    """Tiny datasets of the three synthetic tasks (224 px images)."""
    from data_gen.tasks import build_task
    from data_gen.writer import generate_dataset

    root = tmp_path_factory.mktemp("evaldata")
    specs = {
        "grid_patch": ("easy", {"image_size": 224}),
        "line_intersection": ("easy", {"image_size": 224}),
        "line_tracing": ("easy", {"image_size": 224, "line_width": 2, "node_radius": 8, "num_nodes": (6, 8)}),
    }
    out = {}
    for name, (preset, over) in specs.items():
        task = build_task(name, preset=preset, overrides=over)
        generate_dataset(task, num=20, seed=1, out=str(root / name), progress=False)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> str:
    """A LoRA adapter on the tiny model with non-zero weights (a fresh LoRA is the identity)."""
    from klal.models.loader import ModelConfig, load_model_and_processor
    from klal.models.lora import LoraSettings, apply_lora

    model, _ = load_model_and_processor(ModelConfig(max_pixels=224 * 224))
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(str(path))
    return str(path)


def text_record(k: int) -> dict:
    """A text-only grid_patch row (no image, empty evidence)."""
    from klal.data.schema import Evidence, make_record

    return make_record(
        id=f"text-{k}", task="grid_patch", image=None, question="What is 2 + 3?", answer="5", evidence=Evidence()
    )


@pytest.fixture(scope="module")
def mixed_data(task_data, tmp_path_factory) -> dict[str, str]:
    """The same grid_patch image rows saved twice in the klal schema: alone, and with text-only rows mixed in (first
    rows of a split, between image rows and last), plus a dataset of text-only rows alone."""
    import datasets

    from klal.data.io import load_split
    from klal.data.schema import FEATURES

    source = list(load_split(task_data["grid_patch"], "train", 7))
    text = iter(text_record(k) for k in range(100))
    image_only = {"test": source[:4], "train": source[4:7]}
    # Every split starts with a text row; "test" also has two in a row and one at the end.
    mixed = {
        "test": [next(text), source[0], source[1], next(text), next(text), source[2], source[3], next(text)],
        "train": [next(text), next(text), source[4], source[5], next(text), source[6]],
    }
    # The test rows again, under ids of their own (a sample in two splits is refused, klal.data.io).
    mixed["validation"] = [dict(r, id=f"{r['id']}-val") for r in mixed["test"]]
    text_only = {name: [next(text), next(text)] for name in ("train", "validation", "test")}
    root = tmp_path_factory.mktemp("mixed")
    out = {}
    for name, splits in (("image_only", image_only), ("mixed", mixed), ("text_only", text_only)):
        dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v, features=FEATURES) for k, v in splits.items()})
        dd.save_to_disk(str(root / name))
        out[name] = str(root / name)
    return out
