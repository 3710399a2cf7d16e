from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_mvtec_root, write_png
from PIL import Image

from ccnf.data.images import load_image, load_mask
from ccnf.data.manifest import Manifest, index_root
from ccnf.errors import CcnfError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_mvtec_root(tmp_path / "ds", ["alpha", "beta"], n_train=3, n_good=1, n_bad=2)


def test_index_lists_every_image_with_mask_and_hash(root: Path, tmp_path: Path) -> None:
    m = index_root(root, ["alpha", "beta"], progress=False)
    assert len(m.records) == 2 * (3 + 1 + 2)
    bad = [r for r in m.records if r.defect != "good"]
    assert all(r.mask and r.mask.endswith("_mask.png") and r.label == 1 for r in bad)
    assert all(r.mask is None for r in m.records if r.defect == "good")
    assert len({r.sha1 for r in m.records}) == len(m.records)
    m.save(tmp_path / "manifest.json")
    assert Manifest.load(tmp_path / "manifest.json") == m


def test_changing_an_image_changes_the_manifest(root: Path) -> None:
    before = index_root(root, ["alpha"], progress=False)
    write_png(root / "alpha" / "train" / "good" / "000.png", np.zeros((48, 48, 3), np.uint8))
    after = index_root(root, ["alpha"], progress=False)
    assert before.records[0].sha1 != after.records[0].sha1


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CcnfError, match=r"data\.root does not exist") as info:
        index_root(tmp_path / "nowhere", ["a"], progress=False)
    assert "dvc exp run -S data.root" in str(info.value)


def test_missing_class_names_classes_found(root: Path) -> None:
    with pytest.raises(CcnfError, match=r"classes missing on disk.*gamma") as info:
        index_root(root, ["alpha", "gamma"], progress=False)
    assert "alpha, beta" in str(info.value)


def test_defect_without_mask_names_the_file(root: Path) -> None:
    (root / "beta" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(CcnfError, match="without a ground-truth mask") as info:
        index_root(root, ["alpha", "beta"], progress=False)
    assert "beta/test/hole/001.png" in str(info.value)


def test_corrupt_image_names_the_file(root: Path) -> None:
    bad = root / "alpha" / "test" / "good" / "000.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    with pytest.raises(CcnfError, match="cannot decode image") as info:
        index_root(root, ["alpha"], progress=False)
    assert str(bad) in str(info.value)


def test_grayscale_images_load_as_three_channels(tmp_path: Path) -> None:
    write_png(tmp_path / "g.png", np.full((10, 12), 128, np.uint8))
    img = load_image(tmp_path / "g.png", 8)
    assert img.shape == (8, 8, 3) and img.dtype == np.float32
    assert np.allclose(img, 128 / 255)
    write_png(tmp_path / "m.png", np.pad(np.full((4, 4), 255, np.uint8), 4))
    mask = load_mask(tmp_path / "m.png", 12)
    assert mask.dtype == bool and mask.sum() == 16


def test_masks_coded_zero_one_are_refused(root: Path) -> None:
    """0/1 masks under the 0/255 convention would read as empty: prepare names the file."""
    mask = root / "alpha" / "ground_truth" / "hole" / "000_mask.png"
    write_png(mask, (np.asarray(Image.open(mask)) > 0).astype(np.uint8))
    with pytest.raises(CcnfError, match="has no pixel above 127") as info:
        index_root(root, ["alpha"], progress=False)
    assert str(mask) in str(info.value) and "0/1 -> 0/255" in str(info.value)
