"""klal.data.io.load_split, the one split loader: what it returns and the error for each kind of bad input."""

from __future__ import annotations

import datasets
import pytest
from PIL import Image

from klal.data.io import load_split
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
