"""VisA read through its official split CSV, with its mask convention, on a generated folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_visa_root, tiny_params
from PIL import Image

from ccnf.config import parse_params
from ccnf.data.images import load_mask
from ccnf.data.sources import index_source
from ccnf.data.visa import VISA_CSV, VISA_MASK_THRESHOLD, index_visa, read_visa_csv
from ccnf.errors import CcnfError

OBJECTS = ["candle", "pcb1"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_visa_root(tmp_path / "visa", OBJECTS, n_train=4, n_good=2, n_bad=3)


def _csv(root: Path) -> Path:
    return root / VISA_CSV


def test_csv_split_is_read_as_is(root: Path) -> None:
    m = index_visa(root, OBJECTS, progress=False)
    assert m.mask_threshold == VISA_MASK_THRESHOLD == 0
    for obj in OBJECTS:
        train, test = m.select(obj, "train"), m.select(obj, "test")
        assert len(train) == 4 and all(r.defect == "good" and r.mask is None for r in train)
        assert [r.label for r in test] == [1, 1, 1, 0, 0]  # 'anomaly' sorts before 'good'
        bad = [r for r in test if r.label]
        assert all(r.defect == "anomaly" for r in bad)
        assert all(r.mask == r.image.replace("Images", "Masks").replace(".JPG", ".png")
                   for r in bad)
        assert all(r.image.startswith(f"{obj}/Data/Images/") for r in train + test)


def test_record_order_does_not_depend_on_the_csv_row_order(root: Path) -> None:
    before = index_visa(root, OBJECTS, progress=False)
    header, *rows = _csv(root).read_text().splitlines()
    _csv(root).write_text("\n".join([header, *reversed(rows)]) + "\n")
    assert index_visa(root, OBJECTS, progress=False) == before


def test_class_order_follows_the_params(root: Path) -> None:
    m = index_visa(root, ["pcb1", "candle"], progress=False)
    assert m.records[0].cls == "pcb1" and m.records[-1].cls == "candle"
    assert {r.cls for r in index_visa(root, ["pcb1"], progress=False).records} == {"pcb1"}


def test_visa_masks_are_nonzero_coded(root: Path) -> None:
    """Mask value 1 marks a defect in VisA: the manifest's threshold keeps it, 0/255's loses it."""
    m = index_visa(root, OBJECTS, progress=False)
    rec = next(r for r in m.records if r.label)
    raw = np.asarray(Image.open(root / rec.mask))
    assert set(np.unique(raw)) == {0, 1}
    mask = load_mask(root / rec.mask, 48, m.mask_threshold)
    assert mask.sum() == 144 and np.array_equal(mask, raw > 0)  # the 12x12 defect square
    assert load_mask(root / rec.mask, 48).sum() == 0  # the MVTec rule would drop the defect


def test_extracted_test_masks_carry_the_defects(root: Path, tmp_path: Path) -> None:
    """Through the extract stage's code: cached masks of VisA anomalies are not empty."""
    from ccnf.features import extract_features, load_split

    raw = tiny_params(root, [OBJECTS])
    raw["data"].update(source="visa", classes=OBJECTS, protocol="all-in-one")
    raw["backbone"]["weights"] = "random"  # the masks are the point, not the features
    params = parse_params(raw)
    manifest = index_source("visa", root, params.classes, progress=False)
    extract_features(manifest, params, tmp_path / "features", device=torch.device("cpu"))
    for obj in OBJECTS:
        test = load_split(tmp_path / "features", obj, "test")
        assert test.masks is not None
        per_image = test.masks.flatten(1).sum(1)
        assert bool((per_image[test.labels == 1] > 0).all())
        assert int(per_image[test.labels == 0].sum()) == 0


def test_missing_csv_points_at_the_root(tmp_path: Path) -> None:
    (tmp_path / "visa").mkdir()
    with pytest.raises(CcnfError, match=r"VisA split file not found: .*1cls\.csv") as info:
        index_visa(tmp_path / "visa", OBJECTS, progress=False)
    assert "data.root" in str(info.value)


def test_csv_with_bom_and_missing_column(root: Path) -> None:
    text = _csv(root).read_text()
    _csv(root).write_text("\ufeff" + text, encoding="utf-8")
    assert len(read_visa_csv(root)) == 2 * (4 + 2 + 3)
    _csv(root).write_text(text.replace("object,split,label,image,mask", "object,split,image"))
    with pytest.raises(CcnfError, match="lacks the column"):
        read_visa_csv(root)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("train,normal", "train,ok", 1), "label 'ok' is not normal"),
        (lambda t: t.replace(",train,", ",val,", 1), "split 'val' is not train or test"),
        (lambda t: t.replace(",candle/Data/Masks/Anomaly/000.png", ",", 1), "has no mask"),
        (lambda t: t.replace("Normal/0000.JPG", "Normal/9999.JPG", 1), "image listed"),
    ],
)
def test_bad_rows_name_the_csv_line(root: Path, edit, message: str) -> None:
    _csv(root).write_text(edit(_csv(root).read_text()))
    with pytest.raises(CcnfError) as info:
        index_visa(root, OBJECTS, progress=False)
    assert message in str(info.value) and "1cls.csv, line " in str(info.value)


def test_class_not_in_the_csv_lists_the_objects(root: Path) -> None:
    with pytest.raises(CcnfError, match="classes not in") as info:
        index_visa(root, ["candle", "cashew"], progress=False)
    assert "objects listed there: candle, pcb1" in str(info.value)


def test_visa_params_default_to_the_twelve_objects(tmp_path: Path) -> None:
    raw = tiny_params(tmp_path, [OBJECTS])
    raw["data"].update(source="visa", classes=None, protocol="3x4")
    raw["tasks"] = {f"t{i}": {"prev": "models/init" if i == 0 else f"models/t{i - 1}"}
                    for i in range(3)}
    p = parse_params(raw)
    assert p.split[0] == ["candle", "capsules", "cashew", "chewinggum"]
    assert p.split[2][-1] == "pipe_fryum"
