"""The benchmark fixture (use with ``pytest_plugins = ["tests.bench_data"]``): each public layout of
:mod:`tests.bench_layouts` converted to a klal dataset."""

from __future__ import annotations

import pytest

from tests.bench_layouts import make_pope_authors, make_refcoco_parquet, make_textvqa_authors, make_vstar_folder


@pytest.fixture(scope="module")
def bench_datasets(tmp_path_factory) -> dict[str, str]:
    """Each benchmark's fixture converted to a klal dataset (``save_to_disk``): ``vstar``, ``textvqa``, ``pope``,
    ``refcoco``."""
    from klal.data.pope import convert_pope
    from klal.data.refcoco import convert_refcoco
    from klal.data.textvqa import convert_textvqa
    from klal.data.vstar import convert_vstar

    root = tmp_path_factory.mktemp("bench")
    vstar = make_vstar_folder(root / "vstar_bench")
    tv = make_textvqa_authors(root / "textvqa")
    pope = make_pope_authors(root / "pope")
    ref = make_refcoco_parquet(root / "refcoco")
    out = {name: str(root / f"klal_{name}") for name in ("vstar", "textvqa", "pope", "refcoco")}
    convert_vstar(str(vstar), out=out["vstar"])
    convert_textvqa(
        str(tv / "TextVQA_0.5.1_val.json"),
        image_dir=str(tv / "train_images"),
        ocr_file=str(tv / "TextVQA_Rosetta_OCR_v0.2_val.json"),
        out=out["textvqa"],
    )
    convert_pope(str(pope), image_dir=str(pope / "val2014"), categories=["adversarial", "random"], out=out["pope"])
    convert_refcoco(str(ref), out=out["refcoco"])
    return out
