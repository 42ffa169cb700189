"""Loaders of the papers' data sets and organizations' formats, on small fixtures written in each real on-disk
format (JPEG/PNG files, CoOp split JSON, CIFAR pickles, class folders, CSV manifests), and their errors."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from dpfpl.common.data.cifar import load_cifar
from dpfpl.common.data.coop import load_coop_dataset
from dpfpl.common.data.folder import load_folder_dataset, load_manifest_dataset
from dpfpl.common.data.images import DatasetError
from dpfpl.common.data.registry import load_dataset


def _jpeg(path, seed, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def make_caltech(root, classes=("Faces_easy_x", "leopard_cat", "airplane"), n_train=3, n_test=2):
    """CoOp's caltech-101 layout: class folders under 101_ObjectCategories + split_zhou_Caltech101.json."""
    folder = root / "caltech-101"
    split = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(classes):
        for i in range(n_train + n_test + 1):
            rel = f"{cls}/image_{i:04d}.jpg"
            _jpeg(folder / "101_ObjectCategories" / rel, seed=label * 100 + i)
            which = "train" if i < n_train else "test" if i < n_train + n_test else "val"
            split[which].append([rel, label, cls])
    (folder / "split_zhou_Caltech101.json").write_text(json.dumps(split))
    return split


def test_coop_split_file_is_read_with_cleaned_class_names(tmp_path):
    split = make_caltech(tmp_path)
    data = load_coop_dataset("caltech101", tmp_path)
    assert data.classnames == ["Faces easy x", "leopard cat", "airplane"]
    assert len(data) == len(split["train"]) + len(split["test"])  # val is not used
    assert int(data.is_test.sum()) == len(split["test"])
    assert np.bincount(data.labels[~data.is_test]).tolist() == [3, 3, 3]
    img = data.source.image(0)
    assert img.mode == "RGB" and img.size == (20, 16)
    assert load_dataset("caltech101", str(tmp_path)).fingerprint == data.fingerprint


def test_coop_flat_image_folder_oxford_pets(tmp_path):
    folder = tmp_path / "oxford_pets"
    split = {"train": [], "val": [], "test": []}
    for label, breed in enumerate(["Abyssinian", "american_bulldog"]):
        for i in range(3):
            name = f"{breed}_{i}.jpg"
            _jpeg(folder / "images" / name, seed=label * 10 + i)
            split["train" if i < 2 else "test"].append([name, label, breed.lower()])
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    data = load_coop_dataset("oxford_pets", tmp_path)
    assert data.classnames == ["abyssinian", "american bulldog"]
    assert int(data.is_test.sum()) == 2


def test_coop_errors_name_the_file_and_the_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"caltech-101/101_ObjectCategories.*\n.*split_zhou_Caltech101.json"):
        load_coop_dataset("caltech101", tmp_path)
    make_caltech(tmp_path)
    split_path = tmp_path / "caltech-101" / "split_zhou_Caltech101.json"
    good = split_path.read_text()
    split_path.write_text(good[: len(good) // 2])  # truncated download
    with pytest.raises(DatasetError, match="split_zhou_Caltech101.json is not valid JSON"):
        load_coop_dataset("caltech101", tmp_path)
    bad = json.loads(good)
    bad["train"][0] = ["leopard_cat/x.jpg", "one", "leopard_cat"]
    split_path.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"train\[0\].*label \(int\)"):
        load_coop_dataset("caltech101", tmp_path)
    bad = json.loads(good)
    bad["train"][0][2] = "another name"
    split_path.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="label 0 is named both"):
        load_coop_dataset("caltech101", tmp_path)
    split_path.write_text(good)
    os.remove(tmp_path / "caltech-101" / "101_ObjectCategories" / "airplane" / "image_0001.jpg")
    with pytest.raises(DatasetError, match="1 images listed in .*split_zhou_Caltech101.json are missing.*image_0001"):
        load_coop_dataset("caltech101", tmp_path)


def _cifar_batch(n, num_classes, seed, label_key):
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
        label_key.encode(): rng.integers(0, num_classes, n).tolist(),
        b"batch_label": b"fixture",
    }


def make_cifar10(root, per_batch=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, fh)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump(_cifar_batch(per_batch, 10, i, "labels"), fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(_cifar_batch(per_batch, 10, 99, "labels"), fh)
    return folder


def test_cifar10_and_cifar100_in_torchvision_format(tmp_path):
    folder = make_cifar10(tmp_path)
    data = load_cifar("cifar10", tmp_path)
    assert data.classnames[1] == "automobile" and len(data.classnames) == 10
    assert len(data) == 36 and int(data.is_test.sum()) == 6
    # channel-first rows become HWC images: pixel (0, 0) of record 0 is (R, G, B) = data[0, 0], [1024], [2048]
    with open(folder / "data_batch_1", "rb") as fh:
        raw = pickle.load(fh)[b"data"][0]
    assert np.asarray(data.source.image(0))[0, 0].tolist() == [raw[0], raw[1024], raw[2048]]

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    fine = [f"class_{i}".encode() for i in range(100)]
    with open(c100 / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f.decode() for f in fine], "coarse_label_names": ["x"] * 20}, fh)
    for name, seed in (("train", 1), ("test", 2)):
        with open(c100 / name, "wb") as fh:
            pickle.dump(_cifar_batch(8, 100, seed, "fine_labels"), fh)
    data = load_cifar("cifar100", tmp_path)
    assert len(data.classnames) == 100 and data.classnames[3] == "class 3" and len(data) == 16


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_pickles_that_would_run_code_and_names_bad_files(tmp_path):
    folder = make_cifar10(tmp_path)
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, fh)
    with pytest.raises(DatasetError, match=r"data_batch_3 is not a readable CIFAR batch.*refusing to load .*system"):
        load_cifar("cifar10", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"CIFAR file not found: .*data_batch_3\n.*torchvision"):
        load_cifar("cifar10", tmp_path)
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DatasetError, match=r"data_batch_3: 'data' must be uint8 \(N, 3072\)"):
        load_cifar("cifar10", tmp_path)


def test_folder_tree_and_csv_manifest(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for k, cls in enumerate(("golden_retriever", "tabby")):
            for i in range(n):
                _jpeg(tmp_path / "tree" / split / cls / f"{i}.png", seed=k * 10 + i)
    data = load_folder_dataset(tmp_path / "tree")
    assert data.classnames == ["golden retriever", "tabby"] and int(data.is_test.sum()) == 2

    rows = ["path,label,split"] + [
        f"tree/{s}/{c}/{i}.png,{c},{s}"
        for s in ("train", "test")
        for c in ("tabby", "golden_retriever")
        for i in range(3 if s == "train" else 1)
    ]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    manifest = load_manifest_dataset(tmp_path)
    assert manifest.classnames == data.classnames and len(manifest) == 8
    # an explicit class list fixes the order and must contain every label
    assert load_manifest_dataset(tmp_path, ["tabby", "golden_retriever"]).classnames == ["tabby", "golden retriever"]
    with pytest.raises(DatasetError, match=r"labels not in the run's classnames: \['golden_retriever'\]"):
        load_manifest_dataset(tmp_path, ["tabby", "cat"])
    (tmp_path / "manifest.csv").write_text("file,class\nx.png,tabby\n")
    with pytest.raises(DatasetError, match="header must be 'path,label"):
        load_manifest_dataset(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,label\ntree/train/tabby/0.png\n")
    with pytest.raises(DatasetError, match=r"manifest.csv:2: every row needs a path and a label"):
        load_manifest_dataset(tmp_path)


def test_corrupt_images_are_all_named_before_any_feature_is_cached(tmp_path, tiny_model, cache_dir):
    from dpfpl.common.features import dataset_features

    for split, n in (("train", 3), ("test", 1)):
        for k, cls in enumerate(("a", "b")):
            for i in range(n):
                _jpeg(tmp_path / split / cls / f"{i}.jpg", seed=k * 10 + i)
    (tmp_path / "train" / "a" / "1.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "test" / "b" / "0.jpg").write_bytes((tmp_path / "train" / "a" / "0.jpg").read_bytes()[:40])  # cut
    data = load_folder_dataset(tmp_path)
    with pytest.raises(
        DatasetError, match=r"2 images of folder cannot be used:(.|\n)*train/a/1.jpg(.|\n)*test/b/0.jpg"
    ):
        dataset_features(tiny_model, data, str(cache_dir))
    assert not list((cache_dir / "features").glob(f"*{data.fingerprint}*"))
