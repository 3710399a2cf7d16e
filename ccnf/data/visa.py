"""VisA, read through its official one-class split (``split_csv/1cls.csv``), not a re-layout.

VisA (Zou et al., ECCV 2022) ships as::

    <root>/split_csv/1cls.csv                  object,split,label,image,mask
    <root>/<object>/Data/Images/Normal/*.JPG
    <root>/<object>/Data/Images/Anomaly/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png

Each CSV row is one image: ``object`` (the class), ``split`` (train | test), ``label``
(normal | anomaly), ``image`` and, for anomalies, ``mask`` (paths relative to the root). The
split is the authors' one-class protocol (normal images only in train), so nothing is
re-drawn here.

Mask convention: VisA's masks are not 0/255 like MVTec AD's. Background is 0 and a defect pixel
carries a small non-zero value (a defect index), so a pixel is a defect when it is non-zero:
the manifest records ``mask_threshold = 0`` and every later stage applies ``mask > 0``. The
class's CSV has no defect type, so every anomaly gets the defect type ``anomaly``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from rich.progress import track

from ccnf.data.manifest import Manifest, check_counts, make_record, require_root
from ccnf.errors import CcnfError

VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_MASK_THRESHOLD = 0  # defect pixels are non-zero
VISA_DEFECT = "anomaly"  # the defect type of every VisA anomaly (the CSV names none)
_LABELS = {"normal": "good", "anomaly": VISA_DEFECT}
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class VisaRow:
    """One image of the CSV (``line``: its 1-based line number, for error messages)."""

    line: int
    cls: str
    split: str
    defect: str  # "good" or "anomaly"
    image: str
    mask: str | None


def read_visa_csv(root: Path) -> list[VisaRow]:
    """Parse ``<root>/split_csv/1cls.csv``; every malformed row is an error naming its line."""
    path = Path(root) / VISA_CSV
    if not path.is_file():
        raise CcnfError(
            f"VisA split file not found: {path}",
            where="params.yaml: data.root",
            fix="point data.root at the extracted VisA folder (the one holding split_csv/ and "
            "the object folders), or use data.source folder for MVTec-layout data",
        )
    # utf-8-sig: a byte-order mark would otherwise glue itself to the first column's name
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CcnfError(
                f"{path} lacks the column(s) {', '.join(missing)} "
                f"(has: {', '.join(reader.fieldnames or []) or 'no header'})",
                where=str(path),
                fix=f"VisA's 1cls.csv starts with the header {','.join(VISA_COLUMNS)}",
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            where = f"{path}, line {line}"
            values = {k: (row.get(k) or "").strip() for k in VISA_COLUMNS}
            if values["split"] not in _SPLITS:
                raise CcnfError(f"split '{values['split']}' is not train or test", where=where)
            if values["label"] not in _LABELS:
                raise CcnfError(
                    f"label '{values['label']}' is not normal or anomaly", where=where
                )
            if not values["object"] or not values["image"]:
                raise CcnfError("row without object or image", where=where)
            anomaly = values["label"] == "anomaly"
            if anomaly and not values["mask"]:
                raise CcnfError(
                    f"anomalous image {values['image']} has no mask", where=where,
                    fix="add the mask path in the mask column, or drop the row",
                )
            if anomaly and values["split"] == "train":
                raise CcnfError(
                    f"anomalous image {values['image']} in the train split: the one-class "
                    "protocol trains on normal images only", where=where,
                    fix="use VisA's split_csv/1cls.csv (not 2cls_*.csv)",
                )
            rows.append(
                VisaRow(
                    line=line,
                    cls=values["object"],
                    split=values["split"],
                    defect=_LABELS[values["label"]],
                    image=values["image"],
                    mask=values["mask"] if anomaly else None,  # normal rows: no mask
                )
            )
    if not rows:
        raise CcnfError(f"{path} lists no image", where=str(path))
    return rows


def visa_classes(root: Path) -> list[str]:
    """The objects the CSV lists, alphabetical."""
    return sorted({r.cls for r in read_visa_csv(root)})


def _file(root: Path, rel: str, row: VisaRow, what: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise CcnfError(
            f"{what} listed in the VisA split file is missing: {path}",
            where=f"{root / VISA_CSV}, line {row.line}",
            fix="extract the complete VisA archive under data.root",
        )
    return path


def index_visa(root: Path, classes: list[str], *, progress: bool = True) -> Manifest:
    """Index ``classes`` of a VisA root; records in a fixed order whatever the CSV's row order.

    Per class: train images, then test images, each sorted by (defect type, path), as
    :func:`ccnf.data.manifest.index_root` orders an MVTec-layout class.
    """
    root = require_root(
        root, "point data.root at the extracted VisA folder (ccnf data use visa --root PATH)")
    rows = read_visa_csv(root)
    listed = sorted({r.cls for r in rows})
    missing = [c for c in classes if c not in listed]
    if missing:
        raise CcnfError(
            f"classes not in {root / VISA_CSV}: {', '.join(missing)}",
            where="params.yaml: data.classes",
            fix=f"objects listed there: {', '.join(listed)}",
        )
    order = {c: i for i, c in enumerate(classes)}
    wanted = sorted(
        (r for r in rows if r.cls in order),
        key=lambda r: (order[r.cls], _SPLITS.index(r.split), r.defect, r.image),
    )
    records = [
        make_record(
            root, r.cls, r.split, r.defect, _file(root, r.image, r, "image"),
            None if r.mask is None else _file(root, r.mask, r, "mask"),
            mask_threshold=VISA_MASK_THRESHOLD,
        )
        for r in track(wanted, description="indexing images", disable=not progress,
                       transient=True)
    ]
    check_counts(records, classes, root)
    return Manifest(str(root), records, VISA_MASK_THRESHOLD)
