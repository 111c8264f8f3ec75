"""tiny-base and tiny-base-v2, the small pretrained Qwen2.5-VLs shipped with klal: each name resolves offline to its
committed folder, the weights are the ones its model card describes, and on freshly drawn curriculum questions (a data
seed the pretraining never used) it answers the skills its card says it learned above their chance level."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from klal.models.config import BUNDLED, ModelConfig

NAMES = sorted(BUNDLED)


def record(name: str) -> dict:
    return json.loads((BUNDLED[name] / "pretrain.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_name_resolves_to_the_committed_folder_in_float32(name) -> None:
    from klal.models.loader import resolve_dtype

    cfg = ModelConfig(name_or_path=name)
    assert cfg.name_or_path == str(BUNDLED[name]) and cfg.is_bundled and not cfg.is_tiny
    assert resolve_dtype(cfg) == torch.float32
    assert not ModelConfig(name_or_path="tiny").is_bundled


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_the_ones_the_card_describes(name) -> None:
    weights = (BUNDLED[name] / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == record(name)["weights_sha256"]
    assert len(weights) <= 30 * 2**20
    card = (BUNDLED[name] / "README.md").read_text()
    assert record(name)["weights_sha256"][:16] in card and "## Held-out accuracy per skill" in card


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_it_answers_fresh_questions_of_its_learned_skills(name, tmp_path, monkeypatch) -> None:
    """Loaded by name with the hub unreachable; 24 fresh questions per learned skill, scored teacher-forced."""
    from data_gen.writer import generate_dataset
    from klal.data.io import load_split
    from klal.models.loader import load_model_and_processor
    from studies.pretrain.curriculum import CurriculumConfig, CurriculumTask
    from studies.pretrain.recipe import skill_accuracy
    from studies.reproduce.pipeline import render_dataset_answers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = record(name)
    refs = rec["references"]
    learned = [
        s
        for s, acc in rec["heldout"].items()
        if s in refs and acc >= max(refs[s][k]["accuracy"] for k in ("chance", "majority", "question_only")) + 0.10
    ]
    if not learned:
        pytest.skip("the card lists no learned skill")
    model, processor = load_model_and_processor(ModelConfig(name_or_path=name))
    cur = rec["data"]["curriculum"]
    config = CurriculumConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cur.items()})
    config.skills = tuple(learned)
    path = tmp_path / "fresh"
    generate_dataset(CurriculumTask(config), num=24 * len(learned) * 2, seed=12345, out=path, splits=(0.25, 0.25, 0.5))
    render_dataset_answers(path, rec["data"]["answer_render"], processor.tokenizer)
    acc = skill_accuracy(model.eval(), processor, load_split(path, "test"), batch_size=24)
    for skill in learned:
        assert acc[skill] >= refs[skill]["chance"]["accuracy"] + 0.10, (skill, acc[skill], refs[skill])
