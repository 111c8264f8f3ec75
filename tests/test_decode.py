"""The greedy decoder: equal to an explicit argmax loop without cache on left-padded batches with images, whatever the
checkpoint's generation config asks for (where model.generate(do_sample=False) is not greedy)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from klal.data.collate import KLALCollator
from klal.decode import config_generate, generate_ids, greedy_generate
from klal.models.qwen2_5_vl.replica import GENERATION_CONFIG
from klal.session import GroundingModel
from tests.conftest import make_row
from tests.grounding_helpers import tiny_model

MAX_NEW = 8


@pytest.fixture(scope="module")
def model64():
    """The tiny model in float64 (argmax margins are ~1e-3, so round-off cannot flip a token), with the generation
    config of Qwen2.5-VL-Instruct plus an n-gram ban."""
    model, processor = tiny_model()
    model = copy.deepcopy(model).to(torch.float64)
    gen = model.generation_config
    gen.repetition_penalty, gen.top_k, gen.top_p, gen.temperature = 1.05, 1, 0.001, 0.1
    gen.no_repeat_ngram_size = 3
    return model, processor


@pytest.fixture(scope="module")
def prompts(model64):
    """Two prompts of different lengths (other image sizes, other questions), encoded alone and as a left-padded
    batch built by hand."""
    _, processor = model64
    collator = KLALCollator(processor)
    rows = [make_row(0, 224, 224, None), make_row(1, 168, 112, None)]
    rows[1]["question"] = "Where?"
    single = []
    for r in rows:
        enc = processor(text=[collator.prompt_text(r["question"], 1)], images=[r["image"]], return_tensors="pt")
        enc["pixel_values"] = enc["pixel_values"].double()
        single.append(dict(enc))
    n = max(e["input_ids"].shape[1] for e in single)
    assert len({e["input_ids"].shape[1] for e in single}) == 2  # the padding is real
    batch = {
        "input_ids": torch.full((2, n), collator.pad_id),
        "attention_mask": torch.zeros((2, n), dtype=torch.long),
        "mm_token_type_ids": torch.zeros((2, n), dtype=torch.long),
        "pixel_values": torch.cat([e["pixel_values"] for e in single]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in single]),
    }
    for i, e in enumerate(single):
        k = e["input_ids"].shape[1]
        batch["input_ids"][i, n - k :] = e["input_ids"][0]
        batch["attention_mask"][i, n - k :] = 1
        batch["mm_token_type_ids"][i, n - k :] = e["mm_token_type_ids"][0]
    return single, batch


def _eos(processor) -> list[int]:
    tok = processor.tokenizer
    return [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]


def _argmax_loop(model, enc: dict, eos: list[int], hook=None) -> tuple[list[int], list[torch.Tensor], list[list[int]]]:
    """The reference: one prompt, a full forward pass over prompt + tokens so far at every step (no cache, positions
    computed by the model itself), argmax of the raw logits. Also returns each step's logits and sequence."""
    ids, mm = enc["input_ids"], enc["mm_token_type_ids"]
    out: list[int] = []
    logits_seen, seqs = [], []
    for _ in range(MAX_NEW):
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=enc["pixel_values"],
                image_grid_thw=enc["image_grid_thw"],
                mm_token_type_ids=torch.nn.functional.pad(mm, (0, ids.shape[1] - mm.shape[1])),
                use_cache=False,
            ).logits[0, -1]
        if hook is not None:
            logits = hook(logits[None], [list(out)])[0]
        logits_seen.append(logits)
        seqs.append(ids[0].tolist())
        t = int(logits.argmax())
        if t in eos:
            break
        out.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out, logits_seen, seqs


def test_greedy_generate_equals_an_argmax_loop_on_a_padded_batch(model64, prompts):
    model, processor = model64
    single, batch = prompts
    eos = _eos(processor)
    refs = [_argmax_loop(model, e, eos)[0] for e in single]
    assert greedy_generate(model, batch, MAX_NEW, eos) == refs
    # Each row alone gives the same tokens as in the batch (left padding shifts no position).
    assert [greedy_generate(model, e, MAX_NEW, eos)[0] for e in single] == refs
    assert all(len(r) >= 4 for r in refs)  # long enough for a repetition penalty to matter


def test_greedy_generate_ignores_the_checkpoints_generation_config(model64, prompts):
    """The penalty of the generation config changes the argmax at some step, and generate(do_sample=False) follows
    it; greedy_generate does not."""
    model, processor = model64
    single, batch = prompts
    eos = _eos(processor)
    penalty = RepetitionPenaltyLogitsProcessor(1.05)
    flips = 0
    for enc in single:
        _, logits, seqs = _argmax_loop(model, enc, eos)
        for z, seq in zip(logits, seqs):
            penalised = penalty(torch.tensor([seq]), z[None].clone())[0]
            flips += int(penalised.argmax() != z.argmax())
    assert flips >= 1  # the case is built so that the generation config matters
    ours = greedy_generate(model, batch, MAX_NEW, eos)
    hf = []
    for enc in single:
        gen = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)[0, enc["input_ids"].shape[1] :].tolist()
        hf.append([t for t in gen if t not in eos])
    assert hf != ours


def test_logits_hook_changes_every_step(model64, prompts):
    model, processor = model64
    single, batch = prompts
    eos = _eos(processor)
    seen: list[list[list[int]]] = []

    def ban_top(logits: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        """Forbid each row's raw argmax (and the stop tokens), so the second-best token is chosen at every step."""
        seen.append(generated)
        out = logits.clone()
        out[torch.arange(len(out)), logits.argmax(-1)] = float("-inf")
        out[:, eos] = float("-inf")
        return out

    got = greedy_generate(model, batch, 3, eos, logits_hook=ban_top)
    refs = [_argmax_loop(model, e, eos, hook=ban_top)[0][:3] for e in single]
    assert got == refs and all(len(r) == 3 for r in got)
    assert seen[0] == [[], []] and seen[1] == [[got[0][0]], [got[1][0]]]  # the hook sees the tokens so far


def test_grounding_model_generate_uses_it(model64, prompts):
    model, processor = model64
    single, _ = prompts
    gm = GroundingModel(model, processor)
    row = make_row(0, 224, 224, None)
    inputs = gm.inputs([row["image"]], row["question"])
    ref, _, _ = _argmax_loop(model, single[0], _eos(processor))
    before = gm.passes["forward"]
    assert gm.generate(inputs, MAX_NEW) == processor.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert gm.passes["forward"] - before == min(len(ref) + 1, MAX_NEW)


@pytest.fixture(scope="module")
def published64():
    """The tiny model in float64 with the sampling and penalty settings of Qwen2.5-VL-Instruct's published
    generation_config.json (repetition_penalty 1.05, do_sample, temperature, top_p, top_k) and nothing else."""
    model, processor = tiny_model()
    model = copy.deepcopy(model).to(torch.float64)
    for key in ("do_sample", "repetition_penalty", "temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, GENERATION_CONFIG[key])
    return model, processor


def _penalised(prompt_ids: list[int], penalty: float):
    """A logits hook applying a repetition penalty by hand: every token id already in the sequence (prompt and answer
    so far) has its logit divided by ``penalty`` if positive, multiplied by it otherwise."""

    def hook(logits: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        out = logits.clone()
        for t in set(prompt_ids) | set(generated[0]):
            z = float(out[0, t])
            out[0, t] = z / penalty if z > 0 else z * penalty
        return out

    return hook


def test_config_generate_applies_the_checkpoints_penalty_and_ignores_its_sampling(published64, prompts):
    model, processor = published64
    single, batch = prompts
    eos = _eos(processor)
    # The reference: the no-cache argmax loop with the penalty applied by hand; temperature, top_p and top_k play no
    # part under do_sample=False.
    refs = [_argmax_loop(model, e, eos, hook=_penalised(e["input_ids"][0].tolist(), 1.05))[0] for e in single]
    assert [config_generate(model, e, MAX_NEW, eos)[0] for e in single] == refs
    assert config_generate(model, batch, MAX_NEW, eos) == refs  # left padding is not penalised
    # The two settings differ on this model: the greedy decoder takes the raw argmax.
    greedy = greedy_generate(model, batch, MAX_NEW, eos)
    assert greedy == [_argmax_loop(model, e, eos)[0] for e in single] and greedy != refs

    # GroundingModel.generate decodes either way on request and counts one forward pass per step, the stop's included.
    gm = GroundingModel(model, processor)
    row = make_row(0, 224, 224, None)
    inputs = gm.inputs([row["image"]], row["question"])
    for decoding, ref in (("generation_config", refs[0]), ("greedy", greedy[0])):
        before = gm.passes["forward"]
        text = gm.generate(inputs, MAX_NEW, decoding=decoding)
        assert text == processor.tokenizer.decode(ref, skip_special_tokens=True).strip()
        assert gm.passes["forward"] - before == min(len(ref) + 1, MAX_NEW)


def test_bad_arguments():
    model, processor = tiny_model()
    ids = {"input_ids": torch.tensor([[1, 2]])}
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        greedy_generate(model, ids, 0, [1])
    with pytest.raises(ValueError, match="eos_token_ids is empty"):
        greedy_generate(model, ids, 1, [])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        config_generate(model, ids, 0, [1])
    with pytest.raises(ValueError, match="decoding must be 'greedy' or 'generation_config', got 'beam'"):
        generate_ids(model, ids, 1, [1], decoding="beam")
    with pytest.raises(ValueError, match="logits_hook needs decoding='greedy'"):
        generate_ids(model, ids, 1, [1], decoding="generation_config", logits_hook=lambda z, g: z)
