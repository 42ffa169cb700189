"""Silo mode: real image files in the layouts organizations have, checked before training."""

import numpy as np
import pytest
from PIL import Image

from dpfpl.common.data.silo import SiloError, load_silo

CLASSES = ["cat", "dog", "cow"]


def write_images(folder, n, seed, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}{suffix}"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_class_folders_with_split(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        for c in ("cat", "dog"):
            write_images(tmp_path / split / c, n, seed=hash((split, c)) % 1000)
    silo = load_silo(tmp_path, CLASSES)
    assert len(silo.paths) == 12 and silo.is_test.sum() == 4
    assert set(silo.labels.tolist()) == {0, 1}


def test_csv_manifest_without_split_is_split_per_class(tmp_path):
    paths = write_images(tmp_path / "imgs", 10, seed=1, suffix=".jpg")
    rows = ["path,label"] + [f"imgs/{p.name},{'cow' if i % 2 else 'cat'}" for i, p in enumerate(paths)]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    silo = load_silo(tmp_path, CLASSES, seed=0)
    assert sorted(set(silo.labels.tolist())) == [0, 2]
    assert silo.is_test.sum() == 2  # 20% of each class of 5
    assert np.array_equal(silo.is_test, load_silo(tmp_path, CLASSES, seed=0).is_test)


def test_unknown_label_and_corrupt_image_are_named(tmp_path):
    write_images(tmp_path / "cat", 3, seed=2)
    write_images(tmp_path / "horse", 2, seed=3)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SiloError) as err:
        load_silo(tmp_path, CLASSES)
    text = str(err.value)
    assert "horse" in text and "broken.png" in text


def test_empty_or_missing_silo(tmp_path):
    with pytest.raises(SiloError, match="does not exist"):
        load_silo(tmp_path / "nope", CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiloError, match="holds no images"):
        load_silo(tmp_path / "empty", CLASSES)
