"""The grounding base: the GroundingMethod contract every registered method follows (options, the text-only and
crop-size checks, batched runs), GroundingModel.append_tokens against the processor's own encoding, and image_rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import klal.grounding.loc_heads as lh
from klal.grounding.base import GroundingMethod
from klal.grounding.registry import available_methods, build_method, method_class
from klal.session import GroundingError
from tests.grounding_helpers import text_row

pytest_plugins = ["tests.grounding_helpers"]  # the gm, row and rows fixtures

CROPPERS = {
    n for n in available_methods() if "min_crop" in {f.name for f in dataclasses.fields(method_class(n).Options)}
}
"""Methods that crop image 0 with a minimum side (option ``min_crop``)."""


# ----------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("name", available_methods())
def test_every_method_subclasses_the_base_and_declares_frozen_options(name):
    cls = method_class(name)
    assert issubclass(cls, GroundingMethod) and cls.name == name
    method = build_method(name)
    assert dataclasses.is_dataclass(method.options) and method.options == cls.Options()
    field = dataclasses.fields(method.options)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(method.options, field, None)


@pytest.mark.parametrize("name", available_methods())
def test_unknown_option_is_named_with_the_valid_ones(name):
    valid = [f.name for f in dataclasses.fields(method_class(name).Options)]
    with pytest.raises(GroundingError, match=rf"^{name}: unknown option 'bogus'; valid options: ") as err:
        build_method(name, bogus=1)
    assert str(err.value).endswith(", ".join(valid))


@pytest.mark.parametrize("name", available_methods())
def test_bad_option_values_are_named(name):
    """Every bounded numeric option refuses a value below its bound and a value of the wrong type, naming both."""
    checked = 0
    for f in dataclasses.fields(method_class(name).Options):
        bounds = f.metadata.get("bounds", {})
        low = bounds.get("ge", bounds.get("gt"))
        if low is None:
            continue
        for bad in (low - 1, "x", True):
            with pytest.raises(GroundingError, match=rf"^{name}: option {f.name} must be .*, got {bad!r}$"):
                build_method(name, **{f.name: bad})
        checked += 1
    assert checked >= 2  # every method has bounded options (sigma, max_new_tokens, min_crop, ...)


def test_option_values_are_converted_and_checked():
    probe = build_method("attention_probe", query="answer_last", sigma=2)
    assert probe.options.sigma == 2.0 and isinstance(probe.options.sigma, float)
    with pytest.raises(GroundingError, match=r"option query must be one of 'prompt_last', 'answer_last'"):
        build_method("attention_probe", query="first")
    vicrop = build_method("vicrop_rel_att", scales=[0.5, 1])
    assert vicrop.options.scales == (0.5, 1.0)
    with pytest.raises(GroundingError, match=r"option scales must be a non-empty list of numbers in \(0, 1\]"):
        build_method("vicrop_rel_att", scales=[])
    with pytest.raises(GroundingError, match=r"option connectivity must be one of 4, 8, got 6"):
        build_method("entropy_gradient", connectivity=6)
    with pytest.raises(GroundingError, match=r"option max_aspect must be a number >= 1 or None, got 0.5"):
        build_method("entropy_gradient", max_aspect=0.5)
    assert build_method("entropy_gradient", max_aspect=None).options.max_aspect is None
    with pytest.raises(GroundingError, match=r"option layer must be an integer or None, got 1.5"):
        build_method("vicrop_grad_att", layer=1.5)
    with pytest.raises(GroundingError, match=r"option max_new_tokens must be an integer >= 1, got 0"):
        build_method("laser", max_new_tokens=0)
    with pytest.raises(GroundingError, match=r"option plausibility must be a number in \[0, 1\), got 1.0"):
        build_method("laser", plausibility=1.0)


def test_registered_and_bad_options():
    for name in ("vicrop_rel_att", "vicrop_grad_att", "laser"):
        assert name in available_methods()
    with pytest.raises(GroundingError, match="min_crop"):
        build_method("vicrop_rel_att", min_crop=-1)
    with pytest.raises(GroundingError, match="scales"):
        build_method("vicrop_grad_att", scales=(0.5, 1.5))
    with pytest.raises(GroundingError, match="eps"):
        build_method("vicrop_rel_att", eps=-1e-6)
    with pytest.raises(GroundingError, match="plausibility"):
        build_method("laser", plausibility=1.0)
    with pytest.raises(GroundingError, match="top_heads"):
        build_method("laser", top_heads=0)


# ---------------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize("name", available_methods())
def test_check_sizes_refuses_small_images_for_croppers_only(name):
    sizes = [("big", 500, 400), ("narrow", 100, 300), ("empty", 0, 0)]
    if name in CROPPERS:
        method = build_method(name, min_crop=112)
        assert method.min_crop == 112
        method.check_sizes(sizes[:1], "data/x")
        expect = (
            rf"^{name}: sample 'narrow' of data/x has an image of 100 x 300 px, smaller than option min_crop=112 px"
        )
        with pytest.raises(GroundingError, match=expect):
            method.check_sizes(sizes, "data/x")
        build_method(name, min_crop=100).check_sizes(sizes[:2], "data/x")  # 100 px is enough for min_crop=100
        assert build_method(name, min_crop=0).min_crop is None  # 0: no minimum
        build_method(name, min_crop=0).check_sizes(sizes, "data/x")
    else:
        method = build_method(name)
        assert method.min_crop is None
        method.check_sizes(sizes, "data/x")  # nothing to crop: even a 0 x 0 image passes


def test_the_croppers_are_the_methods_with_a_min_crop_option():
    assert (
        {"entropy_gradient", "laser"} <= CROPPERS <= {"entropy_gradient", "laser", "vicrop_grad_att", "vicrop_rel_att"}
    )


@pytest.mark.parametrize("name", available_methods())
def test_text_only_rows_get_the_same_error_from_every_method(gm, name):
    method = build_method(name)
    before = dict(gm.passes)
    with pytest.raises(GroundingError, match=r"sample 'text-0' is text-only \(no image\)"):
        method.run(gm, text_row(0))
    with pytest.raises(GroundingError, match=r"sample 'text-1' is text-only \(no image\)"):
        method.run_batch(gm, [text_row(1)])
    assert gm.passes == before  # refused before any pass


def test_run_checks_the_image_size_before_any_pass(gm):
    from tests.conftest import make_row

    small = make_row(7, 80, 120, None)
    for name in sorted(CROPPERS):
        before = dict(gm.passes)
        with pytest.raises(GroundingError, match=rf"^{name}: sample 'row-7' has an image of 80 x 120 px.*min_crop=112"):
            build_method(name, min_crop=112).run(gm, small)
        assert gm.passes == before


def test_prepare_is_a_no_op_by_default_and_run_counts_cost(gm, row):
    method = build_method("attention_probe")
    method.prepare(gm, [row])
    assert method.options == build_method("attention_probe").options
    res = method.run(gm, row)
    assert res.passes == {"forward": 1, "backward": 0} and res.seconds > 0


def test_a_subclass_writes_only_ground(gm, row):
    """A minimal method: the base supplies options, checks, cost and the per-row run_batch."""

    class Uniform(GroundingMethod):
        name = "uniform_test"

        @dataclasses.dataclass(frozen=True)
        class Options:
            value: float = 1.0

        def ground(self, gm, sample, images):
            inputs = gm.inputs(images, sample["question"])
            gm.forward(inputs)
            return lh.GroundingResult(maps=[np.full(g, self.options.value) for g in inputs["grids"]])

    method = Uniform(value=2.0)
    results = method.run_batch(gm, [row, row])
    assert [r.passes["forward"] for r in results] == [1, 1]  # not batched: one run per row
    assert all(float(r.maps[0].max()) == 2.0 for r in results)
    with pytest.raises(GroundingError, match="uniform_test: unknown option 'values'; valid options: value"):
        Uniform(values=1)
    assert "uniform_test" not in available_methods()  # no name= in the class statement: not registered


def test_a_method_must_write_ground_and_batched_ones_ground_batch():
    """Both omissions are caught when the class is made, before any row is run."""

    class NoGround(GroundingMethod):
        pass

    with pytest.raises(TypeError, match="abstract method ground"):
        NoGround()
    with pytest.raises(TypeError, match="Half sets batched = True but does not implement ground_batch"):

        class Half(GroundingMethod):
            batched = True

            def ground(self, gm, sample, images):
                raise AssertionError("never run")


# ------------------------------------------------------------------------------------------------ append_tokens


def test_append_tokens_matches_the_processor_encoding_of_prompt_and_answer(gm, row):
    """Appending an answer's tokens gives the inputs (and the logits) of encoding prompt + answer as one text."""
    from klal.grounding.probe import append_answer

    prompt = gm.collator.prompt_text(row["question"], 1)
    answer = str(row["answer"])
    ref = gm.processor(text=[prompt + answer + "<|im_end|>"], images=[row["image"]], return_tensors="pt")
    inputs = gm.inputs([row["image"]], row["question"])
    n = inputs["input_ids"].shape[1]
    assert torch.equal(ref["input_ids"][0, :n], inputs["input_ids"][0].cpu())
    ids, n_content = gm.collator.answer_ids(answer)
    assert ids == ref["input_ids"][0, n:].tolist()  # the collator's answer tokens are the joint encoding's
    ext = gm.append_tokens(inputs, ids)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert torch.equal(ext[key].cpu(), ref[key]), key
    assert torch.equal(ext["visual_mask"].cpu(), ref["input_ids"] == gm.image_token_id)
    assert ext["grids"] == inputs["grids"] and ext["image_wh"] == inputs["image_wh"]
    with torch.no_grad():
        ref_logits = gm.model(**{k: v.to(gm.device) for k, v in ref.items()}, use_cache=False).logits
    torch.testing.assert_close(gm.forward(ext), ref_logits, rtol=1e-5, atol=1e-5)
    probed, pos = append_answer(gm, inputs, answer)
    assert torch.equal(probed["input_ids"], ext["input_ids"]) and pos == n + n_content - 1


def test_batched_probe_and_heads_equal_single_sample_runs(gm, rows, tmp_path):
    """One right-padded forward pass over samples with different token grids gives each sample's own maps."""
    sizes = [(224, 224), (280, 168), (168, 112)]  # grids (8, 8), (6, 10), (4, 6): different V, so padding is real
    batch = [dict(r, image=r["image"].resize(wh), width=wh[0], height=wh[1]) for r, wh in zip(rows, sizes)]
    for row, (w, h) in zip(batch, sizes):
        assert gm.inputs([row["image"]], row["question"])["grids"] == [(h // 28, w // 28)]
    heads = lh.HeadSelection([(0, 1), (2, 3), (3, 0)], [1, 1, 1], 1, "tiny", gm.num_layers, gm.num_heads)
    heads.save(str(tmp_path / "heads.json"))
    methods = [
        build_method("attention_probe", query="prompt_last"),
        build_method("attention_probe", query="answer_last", layers="1-2"),
        build_method("localization_heads", heads_file=str(tmp_path / "heads.json")),
    ]
    for method in methods:
        before = gm.passes["forward"]
        batched = method.run_batch(gm, batch)
        assert gm.passes["forward"] - before == 1  # the whole batch in one forward pass
        for row, (w, h), got in zip(batch, sizes, batched):
            want = method.run(gm, row)
            assert [m.shape for m in got.maps] == [(h // 28, w // 28)]
            np.testing.assert_allclose(got.maps[0], want.maps[0], rtol=1e-5, atol=1e-9)
            assert got.boxes == want.boxes
            assert got.passes == {"forward": 1, "backward": 0} and got.seconds > 0
    # generated_last decodes per sample, so it falls back to single runs.
    gen = build_method("attention_probe", query="generated_last", max_new_tokens=1)
    assert [r.answer for r in gen.run_batch(gm, batch[:2])] == [gen.run(gm, r).answer for r in batch[:2]]
    with pytest.raises(GroundingError, match="query must be prompt_last or answer_last"):
        gm.batch_attention(batch, "generated_last")


# ------------------------------------------------------------------------------------------------------ image rows


def test_image_rows_pass_over_text_only_rows(rows):
    import datasets

    from klal.data.schema import FEATURES
    from klal.session import image_rows, text_only_mask

    mixed = [text_row(0), rows[0], text_row(1), text_row(2), rows[1], text_row(3)]
    assert text_only_mask(mixed) == [True, False, True, True, False, True]
    ds = datasets.Dataset.from_list([{k: r[k] for k in FEATURES} for r in mixed], features=FEATURES)
    # On a Dataset the image column is read as Arrow (honouring select() indices); nothing is decoded.
    assert text_only_mask(ds.select([4, 5, 0])) == [False, True, True]
    kept, skipped = image_rows(ds)
    assert isinstance(kept, datasets.Dataset) and kept["id"][:] == [rows[0]["id"], rows[1]["id"]] and skipped == 4
    # With a limit only the text rows before the last kept image row count: they were passed over.
    kept, skipped = image_rows(mixed, 1)
    assert [r["id"] for r in kept] == [rows[0]["id"]] and skipped == 1
    # A multi-image column: an empty list is a text-only row as well.
    multi = datasets.Dataset.from_dict({"image": [[], None, [rows[0]["image"]]]})
    assert text_only_mask(multi) == [True, True, False]
