"""klal.data.io.load_split, the one split loader: what it returns and the error for each kind of bad input."""

from __future__ import annotations

import datasets
import pytest
from PIL import Image

from klal.data.io import DataReadError, ImageDecodeError, check_not_empty, check_unique_ids, load_split, read_row
from klal.data.schema import FEATURES, Evidence, make_record


def rows(n: int, prefix: str = "r") -> list[dict]:
    image = Image.new("RGB", (56, 56))
    return [
        make_record(id=f"{prefix}{i}", task="t", image=image, question="q", answer=str(i), evidence=Evidence())
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ds") / "dd"
    dd = datasets.DatasetDict(
        {s: datasets.Dataset.from_list(rows(n, s), features=FEATURES) for s, n in (("train", 5), ("test", 3))}
    )
    dd.save_to_disk(str(path))
    return str(path)


def test_split_and_first_rows(saved):
    assert load_split(saved, "train")["id"][:] == [f"train{i}" for i in range(5)]
    assert load_split(saved, "test", 2)["id"][:] == ["test0", "test1"]
    assert len(load_split(saved, "test", 100)) == 3


def test_single_dataset_is_the_train_split(tmp_path):
    path = tmp_path / "single"
    datasets.Dataset.from_list(rows(2), features=FEATURES).save_to_disk(str(path))
    assert load_split(path, "train")["id"][:] == ["r0", "r1"]
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits: train"):
        load_split(path, "test")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_max_samples_below_one_names_the_option(saved, bad):
    with pytest.raises(ValueError, match=r"max_samples must be an integer >= 1") as e:
        load_split(saved, "train", bad)
    assert repr(bad) in str(e.value)


def test_missing_split_lists_the_splits(saved):
    with pytest.raises(ValueError, match=r"dd has no split 'validation'; its splits: train, test"):
        load_split(saved, "validation")


def test_missing_directory_and_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset directory not found: .*nowhere"):
        load_split(tmp_path / "nowhere", "train")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"plain is not a dataset saved with save_to_disk"):
        load_split(tmp_path / "plain", "train")


def test_missing_schema_column_names_path_and_split(tmp_path):
    path = tmp_path / "cols"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"id": "a", "question": "q"}])}).save_to_disk(str(path))
    with pytest.raises(ValueError, match=r"cols \[train\]: dataset is missing column\(s\) \['task', 'image'"):
        load_split(path, "train")


# -- rows that used to be read silently wrong (issue 19) ---------------------------------------------------------------
def _save(tmp_path, splits: dict[str, list[dict]], name: str = "dd") -> str:
    path = tmp_path / name
    datasets.DatasetDict({s: datasets.Dataset.from_list(r, features=FEATURES) for s, r in splits.items()}).save_to_disk(
        str(path)
    )
    return str(path)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("id", "r0", r"\[train\]: 1 sample id\(s\) occur more than once, e.g. 'r0' \(2 times\)"),
        ("answer", " \t", r"\[train\]: sample 'r2' \(row 2\) has an empty answer ' \\t'"),
    ],
)
def test_duplicate_ids_and_blank_answers_are_refused(tmp_path, field, value, match):
    wrong = rows(3)
    wrong[2][field] = value
    with pytest.raises(ValueError, match=match):
        load_split(_save(tmp_path, {"train": wrong}), "train")


def test_an_id_in_two_splits_is_refused():
    with pytest.raises(ValueError, match=r"sample id 'r1' is in both the 'train' and the 'validation' split"):
        check_unique_ids(
            {
                "train": datasets.Dataset.from_list(rows(3)),
                "validation": datasets.Dataset.from_list([{**rows(1, "v")[0], "id": "r1"}]),
            },
            "data",
        )


def test_an_empty_split_is_named(tmp_path):
    path = _save(tmp_path, {"train": rows(2), "validation": rows(1, "v")})
    dd = datasets.load_from_disk(path)
    dd["validation"] = dd["validation"].select([])  # saved with no data file at all
    dd.save_to_disk(str(tmp_path / "no_file"))
    with pytest.raises(DataReadError, match=r"split\(s\) 'validation' hold no rows"):
        load_split(str(tmp_path / "no_file"), "train")
    with pytest.raises(ValueError, match=r"^data \[validation\]: the split has no rows"):
        check_not_empty({"validation": datasets.Dataset.from_list(rows(1), features=FEATURES).select([])}, "data")


def test_read_row_decodes_undecoded_images_and_checks_the_declared_size(tmp_path):
    good, bad = rows(2)
    bad["width"] = 448
    path = _save(tmp_path, {"train": [good, bad]})
    ds = load_split(path, "train").cast_column("image", datasets.Image(decode=False))
    where = f"{path} [train]"
    row = read_row(ds, 0, where)
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
    with pytest.raises(ValueError, match=r"\[train\]: sample 'r1' \(row 1\): its width/height columns say 448 x 56"):
        read_row(ds, 1, where)
    damaged = ds.map(lambda r: {**r, "image": {"bytes": b"garbage", "path": "x.png"}}, keep_in_memory=True)
    with pytest.raises(ImageDecodeError, match=r"\[train\]: sample 'r0' \(row 0\): cannot decode its image \(stored"):
        read_row(damaged, 0, where)
