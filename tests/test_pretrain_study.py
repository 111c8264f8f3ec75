"""The pretraining recipe (studies/pretrain): the curriculum's answers checked against its scenes and kept apart from
the evaluation tasks, the schedule on hand-worked values, and a toy run that is deterministic, writes the model card
and loads back as a model folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from studies.pretrain import curriculum as cur
from studies.pretrain import recipe

SMALL = cur.CurriculumConfig(image_size=112, diameter=(10, 20), gap=4, max_objects=3)


def test_curriculum_answers_follow_the_scene_and_avoid_the_evaluation_tasks() -> None:
    task = cur.CurriculumTask(cur.CurriculumConfig())
    patterns = cur.evaluation_templates()
    assert len(patterns) == 4 + 8 + 4 + 4 + 4 + 3 + 9  # every phrasing of the nine evaluation tasks
    seen = set()
    for i in range(240):
        s = task.sample(0, i)
        skill, objs = s.meta["skill"], s.meta["objects"]
        seen.add(skill)
        assert skill == cur.FIRST_SKILLS[i % len(cur.FIRST_SKILLS)]  # every skill of the default mix in turn
        assert not any(p.fullmatch(s.question) for p in patterns), s.question
        boxes = [o["box"] for o in objs]
        assert s.evidence.boxes == boxes
        centre = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
        if skill in ("colour", "shape"):
            assert len(objs) == 1 and s.answer == objs[0][skill]
        elif skill == "count":
            assert s.answer == str(len(objs)) and 1 <= len(objs) <= 6
        elif skill == "position":
            # The drawn pixels' centre lies in the named third of the image.
            row, col = (int(v // (224 / 3)) for v in (centre[0][1], centre[0][0]))
            assert s.answer == cur.position_word(row, col)
        elif skill == "relation":
            axis, sign = cur.RELATIONS[s.meta["relation"]]
            a, b = boxes
            # "a left of b": a's pixels end before b's begin (a gap between the extents), and so on.
            holds = a[axis + 2] <= b[axis] if sign < 0 else b[axis + 2] <= a[axis]
            assert s.answer == ("yes" if holds else "no")
        else:
            order = sorted(range(len(objs)), key=lambda k: centre[k][0])
            assert order == list(range(len(objs)))  # described left to right
            assert all(f"{o['colour']} {o['shape']}" in s.answer for o in objs)
    assert seen == set(cur.FIRST_SKILLS)
    assert cur.position_word(1, 1) == "centre" and cur.position_word(0, 2) == "top right"
    assert cur.position_word(2, 1) == "bottom" and cur.position_word(1, 0) == "left"


def test_marked_skill_answers_the_fill_never_names_the_marker_and_suffixes_follow_the_share() -> None:
    from data_gen.tasks.grid_patch import COLOURS

    task = cur.CurriculumTask(cur.CurriculumConfig(skills=("marked", "colour", "position"), diameter=(28, 60),
                                                   max_objects=4, suffix_share=0.5))  # fmt: skip
    patterns = cur.evaluation_templates()
    styles, suffixed, one_word = set(), 0, 0
    for i in range(0, 300, 3):
        s = task.sample(1, i)
        o = s.meta["objects"][0]
        assert s.meta["skill"] == "marked" and len(s.meta["objects"]) == 1 and s.answer == o["colour"] != o["marker"]
        assert not any(p.fullmatch(s.question) for p in patterns), s.question
        assert not any(c in s.question for c in COLOURS)  # the marker is never named
        pixels = np.asarray(s.image)
        x0, y0, x1, y1 = (int(v) for v in o["box"])
        inside = pixels[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3)
        # The evidence box holds the fill's colour; the marker's colour is drawn outside the fill (a ring, a band or a
        # square), so the answer is the colour of the pixels at the fill's centre.
        assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == COLOURS[o["colour"]]
        assert (inside == COLOURS[o["colour"]]).all(1).mean() > 0.45
        assert (pixels.reshape(-1, 3) == COLOURS[o["marker"]]).all(1).sum() > 50
        styles.add(s.meta["style"])
        suffixed += s.question.endswith(cur.SUFFIXES)
        one_word += 1
    assert styles == set(cur.MARKER_STYLES)
    assert 0.35 < suffixed / one_word < 0.65
    position = task.sample(1, 2)
    assert position.meta["skill"] == "position" and not position.question.endswith(cur.SUFFIXES)  # two-word answers
    meta = task.sample(1, 0).meta
    assert cur.heldout_question(meta, 0) in {
        q + s for q in cur.HELDOUT_TEMPLATES["marked"][:1] for s in ("", " " + cur.SUFFIXES[0])
    }
    assert not set(cur.HELDOUT_TEMPLATES["marked"]) & set(cur.TEMPLATES["marked"])


def test_flat_rule_hand_worked() -> None:
    curve = [{"shape": 0.10}, {"shape": 0.12}, {"shape": 0.13}]
    assert recipe.is_flat(curve, "shape", 2, 0.05)  # +3 points over the last two points
    assert not recipe.is_flat(curve, "shape", 2, 0.02)
    assert not recipe.is_flat(curve, "shape", 3, 0.05)  # too short to tell
    assert not recipe.is_flat([{"colour": 0.1}, {"colour": 0.1}], "shape", 1, 0.05)  # skill not measured


def test_curriculum_config_errors_name_the_option() -> None:
    from data_gen.base import GenerationError

    with pytest.raises(GenerationError, match="skills: unknown"):
        cur.CurriculumTask(cur.CurriculumConfig(skills=("colour", "grid_patch")))
    with pytest.raises(GenerationError, match="too small"):
        cur.CurriculumTask(cur.CurriculumConfig(image_size=56))
    with pytest.raises(GenerationError, match="below 8 px"):
        cur.CurriculumTask(cur.CurriculumConfig(diameter=(4, 20)))
    with pytest.raises(GenerationError, match="suffix_share"):
        cur.CurriculumTask(cur.CurriculumConfig(suffix_share=1.5))
    with pytest.raises(GenerationError, match="marked object and its marker do not fit"):
        cur.CurriculumTask(cur.CurriculumConfig(skills=("marked",), image_size=112, diameter=(60, 90), max_objects=1))


def test_lr_factor_hand_worked() -> None:
    # warmup 4, 10 steps, floor 0.1: (s + 1) / 5 during warmup, then 0.1 + 0.9 * (1 + cos(pi * (s - 4) / 6)) / 2.
    f = [recipe.lr_factor(s, 4, 10, 0.1) for s in (0, 3, 4, 7, 10, 12)]
    assert f == pytest.approx([0.2, 0.8, 1.0, 0.55, 0.1, 0.1])


def _toy(tmp_path: Path, out: str, seed: int = 0) -> dict:
    return recipe.pretrain(
        out=str(tmp_path / out),
        data=recipe.CurriculumData(num=48, splits=(0.5, 0.25, 0.25), folder=str(tmp_path / "data"), curriculum=SMALL),
        model=recipe.BaseModel(tiny_overrides={"num_hidden_layers": 2, "vision_depth": 1,
                                               "vision_fullatt_block_indexes": [0]}),
        train=recipe.Schedule(steps=3, batch_size=4, warmup_steps=1, seed=seed, eval_every=2, eval_samples=6,
                              first_skills=["colour"], first_steps=1),
        loader_workers=0,
    )  # fmt: skip


def test_answer_loss_per_token_and_per_sample_hand_worked() -> None:
    """Two samples over a 3-token vocabulary with logits 0 everywhere except one: each labelled position's loss is
    worked by hand from log-softmax, then averaged over tokens (the transformers default) or per sample first."""
    from klal.data.collate import IGNORE_INDEX as X

    logits = torch.zeros(2, 4, 3)
    logits[0, 1, 2] = 2.0  # sample 0, position 1 predicts token 2 (labelled at position 2)
    labels = torch.tensor([[X, X, 2, X], [X, 0, 1, 2]])
    hard = -torch.log_softmax(torch.tensor([0.0, 0.0, 2.0]), 0)[2].item()  # log(2 + e^2) - 2
    flat = torch.log(torch.tensor(3.0)).item()  # uniform over 3 tokens
    # Sample 0: one labelled token (loss `hard`); sample 1: three, each uniform (loss `flat`).
    assert recipe.answer_loss(logits, labels, "per_token").item() == pytest.approx((hard + 3 * flat) / 4, rel=1e-6)
    assert recipe.answer_loss(logits, labels, "per_sample").item() == pytest.approx((hard + flat) / 2, rel=1e-6)


def test_toy_pretraining_is_deterministic_and_writes_the_card(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from klal.models.loader import ModelConfig, load_model_and_processor

    a = _toy(tmp_path, "a")
    b = _toy(tmp_path, "b")
    c = _toy(tmp_path, "c", seed=1)
    # The first phase (one step of colour questions) has its own dataset, of that skill only.
    from klal.data.io import load_split

    first = load_split(tmp_path / "data_first", "train")
    assert {json.loads(m)["skill"] for m in first["meta"]} == {"colour"}
    # Same config, same weights bit for bit; another data-order seed, other weights.
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]
    assert a["losses"] == b["losses"] and len(a["losses"]) == 3
    wa, wc = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "c" / "model.safetensors"))
    # Full fine-tuning: the vision tower moved too (its weights differ between the two data orders).
    vision = [k for k in wa if "visual.blocks" in k]
    assert vision and any(not torch.equal(wa[k], wc[k]) for k in vision)
    # The learning curve: steps 0, 2 and the last; held-out accuracy per skill on the 12 test items.
    assert [p["step"] for p in a["curve"]] == [0, 2, 3]
    assert sum(a["heldout"]["n"].values()) == 12 and set(a["heldout"]["n"]) == set(cur.FIRST_SKILLS)
    out = tmp_path / "a"
    card = (out / "README.md").read_text()
    assert "## Held-out accuracy per skill" in card and "![loss curve](loss_curve.png)" in card
    # The same test items asked again with phrasings training never used.
    assert "| new phrasings |" in card and a["heldout_new_phrasings"]["n"] == a["heldout"]["n"]
    assert a["stopped_early"] is None
    assert all(f"| {s} |" in card for s in cur.FIRST_SKILLS) and "Never seen" in card
    assert (out / "loss_curve.png").stat().st_size > 0
    assert json.loads((out / "pretrain.json").read_text())["weights_sha256"] == a["weights_sha256"]
    assert a["weights_bytes"] <= recipe.MAX_MB * 2**20
    # The folder loads offline as a checkpoint, with the trained weights (float32: "auto" means bfloat16 for folders).
    model, processor = load_model_and_processor(ModelConfig(name_or_path=str(out), dtype="float32"))
    model.save_pretrained(tmp_path / "again")  # saved again: the same tensors under the same (saved) names
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(again) == set(wa) and all(torch.equal(again[k], v) for k, v in wa.items())
    assert processor.tokenizer("red blue")["input_ids"] == recipe_tokens("red blue")
    # The comparison of bases (studies.pretrain.compare) remakes the curriculum from a config and scores the saved
    # bases: base a on its own test items gives exactly the numbers its pretraining recorded in memory.
    import yaml

    from studies.pretrain import compare

    data = {"num": 48, "splits": [0.5, 0.25, 0.25], "folder": str(tmp_path / "data"),
            "curriculum": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(SMALL).items()}}  # fmt: skip
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({"data": data}))
    scores = compare.compare([str(out), str(tmp_path / "c")], [str(config)], str(tmp_path / "cmp"))[str(config)]
    assert scores[str(out)]["trained"] == a["heldout"] and scores[str(out)]["new"] == a["heldout_new_phrasings"]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    row = next(ln for ln in table.splitlines() if ln.startswith("| colour |"))
    assert row.split(" | ")[2] == f"{100 * a['heldout']['colour']:.1f}"


def recipe_tokens(text: str) -> list[int]:
    from klal.models.qwen2_5_vl.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()(text)["input_ids"]


def test_pretrain_refuses_an_existing_out_and_oversized_weights(tmp_path: Path, capsys) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as e:
        recipe.main(["--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    big = '{"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 8, "num_key_value_heads": 4}'
    with pytest.raises(SystemExit):
        recipe.main(["--out", str(tmp_path / "new"), "--model.tiny_overrides", big])
    assert "MB of float32; at most 30" in capsys.readouterr().err


def test_the_shipped_config_parses_and_fits_the_budget(capsys) -> None:
    import yaml

    from klal.models.qwen2_5_vl.tiny import build_tiny_model, tiny_config

    path = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_base.yaml"
    assert path.read_text().startswith("# python -m studies.pretrain --config configs/pretrain/tiny_base.yaml")
    with pytest.raises(SystemExit) as e:
        recipe.main(["--config", str(path), "--print_config"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["answer_render"] == "fewest_tokens" and cfg["threads"] == 2
    cur.CurriculumTask(cur.CurriculumConfig(**{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in cfg["data"]["curriculum"].items()}))  # fmt: skip
    n = sum(p.numel() for p in build_tiny_model(tiny_config(**cfg["model"]["tiny_overrides"])).parameters())
    assert n * 4 <= recipe.MAX_MB * 2**20
