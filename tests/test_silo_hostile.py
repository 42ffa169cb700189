"""A node's silo as it may really be: files that only half arrived, images built to exhaust memory, file names
that are not UTF-8, manifest rows and symlinks that lead elsewhere on the machine. Each is refused (or, for a
harmless oddity, accepted) through ``load_silo``, the check every node runs before training, with the file
and the reason in the message; never a bare exception that names no file."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from dpfpl.common.data.silo import SiloError, load_images, load_silo

CLASSES = ["cat", "dog", "cow"]


def write_images(folder, n, seed=0, size=16, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}{suffix}"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def refusal(data_dir) -> str:
    with pytest.raises(SiloError) as err:
        load_silo(data_dir, CLASSES)
    text = str(err.value)
    text.encode("utf-8")  # the node logs it: it must be printable whatever the file names are
    return text


def test_truncated_jpeg_is_refused_at_the_check(tmp_path):
    write_images(tmp_path / "cat", 4)
    (half,) = write_images(tmp_path / "dog", 1, size=64, suffix=".jpg")
    truncate(half)
    with Image.open(half) as img:
        img.verify()  # the case that matters: the structural check alone lets it through
    text = refusal(tmp_path)
    assert str(half) in text and "truncated" in text


def test_decompression_bomb_is_refused_with_the_pixel_limit_named(tmp_path, monkeypatch):
    write_images(tmp_path / "cat", 4, size=16)
    bomb = tmp_path / "dog" / "bomb.png"
    bomb.parent.mkdir()
    Image.new("RGB", (64, 64)).save(bomb)
    # 64x64 is more than twice the limit: PIL raises DecompressionBombError, not only its warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)
    text = refusal(tmp_path)
    assert str(bomb) in text and "pixel limit" in text


def test_an_image_past_the_pixel_limit_but_below_twice_it_is_refused_too(tmp_path, monkeypatch):
    """Between MAX_IMAGE_PIXELS and twice it PIL only warns (DecompressionBombWarning) and decodes the image
    anyway: the check makes the warning an error, so this image is refused like a bigger one, naming the file."""
    write_images(tmp_path / "cat", 4, size=16)
    big = tmp_path / "dog" / "big.png"
    big.parent.mkdir()
    Image.new("RGB", (40, 40)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)  # 1,600 pixels: past 1,024, below 2,048
    text = refusal(tmp_path)
    assert str(big) in text and "pixel limit" in text
    assert str(tmp_path / "cat") not in text  # the 256-pixel images are fine


@pytest.mark.parametrize("damage", ["truncated", "bomb"])
def test_file_that_breaks_after_the_check_is_named_when_encoded(tmp_path, monkeypatch, damage):
    write_images(tmp_path / "cat", 3, size=16)
    (victim,) = write_images(tmp_path / "dog", 1, size=64, suffix=".jpg")
    silo = load_silo(tmp_path, CLASSES)
    if damage == "truncated":
        truncate(victim)
    else:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)
    with pytest.raises(SiloError, match="cannot decode image") as err:
        load_images(silo.paths, lambda img: torch.zeros(3))
    assert str(victim) in str(err.value)
    assert ("truncated" if damage == "truncated" else "pixel limit") in str(err.value)


def test_file_name_that_is_not_utf8(tmp_path):
    write_images(tmp_path / "cat", 4)
    good = os.fsencode(tmp_path / "cat") + b"/\xff.png"
    try:
        fd = os.open(good, os.O_CREAT | os.O_WRONLY, 0o644)
    except OSError:
        pytest.skip("this file system refuses file names that are not UTF-8")
    with os.fdopen(fd, "wb") as fh:
        Image.new("RGB", (16, 16), "red").save(fh, format="PNG")
    silo = load_silo(tmp_path, CLASSES)
    assert os.fsdecode(good) in [str(p) for p in silo.paths]
    fingerprint = silo.fingerprint
    assert len(fingerprint) == 16 and load_silo(tmp_path, CLASSES).fingerprint == fingerprint

    # broken, such a file is named by its escaped repr in a message that can be logged
    fd = os.open(os.fsencode(tmp_path / "cat") + b"/\xfe.png", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"not an image")
    os.close(fd)
    assert "\\udcfe.png" in refusal(tmp_path)


def test_manifest_rows_outside_data_dir_are_refused(tmp_path):
    (secret,) = write_images(tmp_path / "elsewhere", 1, seed=9)
    silo_dir = tmp_path / "silo"
    imgs = write_images(silo_dir / "imgs", 4)
    rows = ["path,label"] + [f"imgs/{p.name},cat" for p in imgs]
    rows += ["../elsewhere/img0.png,dog", f"{secret},dog", "imgs/../imgs/img0.png,cat"]
    (silo_dir / "manifest.csv").write_text("\n".join(rows) + "\n")
    text = refusal(silo_dir)
    assert "2 files outside data-dir" in text
    assert f"{silo_dir}/../elsewhere/img0.png (a '..' path that leads outside data-dir)" in text
    assert f"{secret} (an absolute path outside data-dir)" in text
    assert "imgs/../imgs" not in text  # a '..' that stays inside is no escape


def test_symlinks_leading_outside_are_refused_those_inside_allowed(tmp_path):
    write_images(tmp_path / "elsewhere", 2, seed=9)
    silo_dir = tmp_path / "silo"
    cats = write_images(silo_dir / "cat", 4)
    (silo_dir / "cat" / "link.png").symlink_to(tmp_path / "elsewhere" / "img0.png")
    (silo_dir / "dog").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    text = refusal(silo_dir)
    assert "3 files outside data-dir" in text
    assert f"{silo_dir}/cat/link.png (reached through a symlink" in text
    assert f"{silo_dir}/dog/img1.png (reached through a symlink" in text

    # the same links kept inside data-dir are just other names for its own files
    (silo_dir / "cat" / "link.png").unlink()
    (silo_dir / "dog").unlink()
    (silo_dir / "cat" / "link.png").symlink_to(cats[0])
    (silo_dir / "dog").symlink_to(silo_dir / "cat", target_is_directory=True)
    silo = load_silo(silo_dir, CLASSES)
    assert len(silo.paths) == 10 and sorted(set(silo.labels.tolist())) == [0, 1]


def test_manifest_that_is_not_utf8_is_named(tmp_path):
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "manifest.csv").write_bytes(b"path,label\nimgs/img0.png,c\xe9t\n")
    assert "manifest.csv: not a readable" in refusal(tmp_path)
