"""Index an MVTec-AD-layout root into a manifest.

Layout (per class): ``train/good/*.png``, ``test/good/*``, ``test/<defect>/*`` and
``ground_truth/<defect>/<stem>_mask.png``. The manifest lists every image with its class,
split, defect type, mask path and a content hash (image and mask bytes), so changing an image
on disk changes the manifest and DVC re-runs everything downstream. It also records the mask
convention of its dataset (``mask_threshold``: a mask pixel above it is a defect): 127 for
MVTec-layout masks (0 = good, 255 = defect), 0 for VisA's (defect pixels non-zero, see
:mod:`ccnf.data.visa`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from rich.progress import track

from ccnf.atomic import write_json
from ccnf.data.images import check_mask_size, verify_image
from ccnf.errors import CcnfError
from ccnf.store import read_json, recovery_fix

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# MVTec AD convention: masks are 0 (good) / 255 (defect); above the middle is a defect, which
# also holds after lossy saving
MVTEC_MASK_THRESHOLD = 127


@dataclass(frozen=True)
class Record:
    cls: str
    split: str  # "train" | "test"
    defect: str  # "good" or the defect type
    image: str  # path relative to the root
    mask: str | None  # path relative to the root; None for good images
    sha1: str  # of image bytes (+ mask bytes)

    @property
    def label(self) -> int:
        return 0 if self.defect == "good" else 1


@dataclass(frozen=True)
class Manifest:
    root: str
    records: list[Record]
    mask_threshold: int = MVTEC_MASK_THRESHOLD  # a mask pixel > this (grey, 0-255) is a defect

    def select(self, cls: str, split: str) -> list[Record]:
        return [r for r in self.records if r.cls == cls and r.split == split]

    @property
    def classes(self) -> list[str]:
        return sorted({r.cls for r in self.records})

    def save(self, path: Path) -> None:
        write_json(path, {
            "root": self.root,
            "mask_threshold": self.mask_threshold,
            "records": [asdict(r) for r in self.records],
        })

    @staticmethod
    def load(path: Path) -> Manifest:
        if not Path(path).is_file():
            raise CcnfError(f"manifest not found: {path}", fix="run the prepare stage: dvc repro")
        raw = read_json(path, what="manifest")
        try:
            return Manifest(
                str(raw["root"]),
                [Record(**r) for r in raw["records"]],
                int(raw.get("mask_threshold", MVTEC_MASK_THRESHOLD)),
            )
        except (TypeError, KeyError, ValueError) as err:
            raise CcnfError(f"manifest {path} has unexpected content ({err!r})",
                            where=str(path), fix=recovery_fix(path)) from None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _sha1(*paths: Path) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _mask_for(root: Path, cls: str, defect: str, image: Path) -> Path:
    gt = root / cls / "ground_truth" / defect
    for suffix in (".png", image.suffix):
        for name in (f"{image.stem}_mask{suffix}", f"{image.stem}{suffix}"):
            if (gt / name).is_file():
                return gt / name
    raise CcnfError(
        f"defect image without a ground-truth mask: {image}",
        where=f"expected {gt / (image.stem + '_mask.png')}",
        fix="add the mask (white = defect) or remove the image",
    )


def _mask_peak(path: Path) -> int:
    """Largest grey value (0-255) of a mask image."""
    with Image.open(path) as img:
        return int(img.convert("L").getextrema()[1])


def make_record(
    root: Path, cls: str, split: str, defect: str, image: Path, mask: Path | None,
    mask_threshold: int = MVTEC_MASK_THRESHOLD,
) -> Record:
    """One manifest entry; the image (and mask) is decoded once to catch corrupt files.

    A mask whose pixels are all at or below ``mask_threshold`` but not all zero is an error: the
    dataset codes its masks differently (e.g. 0/1), and every defect would silently vanish. A
    mask of another size than its image is an error too (it would be stretched onto
    misaligned pixels).
    """
    size = verify_image(image)
    if mask is not None:
        check_mask_size(image, mask, size, verify_image(mask))
        peak = _mask_peak(mask)
        if 0 < peak <= mask_threshold:
            raise CcnfError(
                f"mask {mask} has no pixel above {mask_threshold} (its largest value is {peak}): "
                "defects would read as empty masks",
                where=str(mask),
                fix="MVTec-layout masks are 0 (good) / 255 (defect): rescale the masks "
                "(e.g. 0/1 -> 0/255)",
            )
    return Record(
        cls=cls,
        split=split,
        defect=defect,
        image=str(image.relative_to(root)),
        mask=None if mask is None else str(mask.relative_to(root)),
        sha1=_sha1(image, *([mask] if mask is not None else [])),
    )


def check_counts(records: list[Record], classes: list[str], root: Path) -> None:
    """Every class needs >= 2 training images and both good and defective test images."""
    for cls in classes:
        n_train = sum(r.cls == cls and r.split == "train" for r in records)
        test = [r for r in records if r.cls == cls and r.split == "test"]
        if n_train < 2 or not any(r.label for r in test) or not any(not r.label for r in test):
            raise CcnfError(
                f"class '{cls}' needs >= 2 training images and both good and defective test "
                f"images (has {n_train} train, {len(test)} test)",
                where=str(root / cls),
            )


def require_root(root: Path, fix: str, *, what: str = "data.root",
                 where: str | None = "params.yaml: data.root") -> Path:
    """``root`` as a Path if it is a directory, else one CcnfError naming ``what`` and ``fix``."""
    root = Path(root)
    if not root.is_dir():
        raise CcnfError(f"{what} does not exist or is not a directory: {root}", where=where,
                        fix=fix)
    return root


def index_root(root: Path, classes: list[str], *, progress: bool = True) -> Manifest:
    """Index ``classes`` under ``root``; every image is decoded once to catch corrupt files."""
    root = require_root(
        root, "point data.root at an MVTec-layout dataset (dvc exp run -S data.root=/path)")
    missing = [c for c in classes if not (root / c / "train" / "good").is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        raise CcnfError(
            f"classes missing on disk under {root}: {', '.join(missing)}",
            where="params.yaml: data.classes / data.root",
            fix=f"classes found there: {', '.join(present) or 'none'}; "
            "fix data.classes or data.root (ccnf data use)",
        )
    jobs: list[tuple[str, str, str, Path]] = []
    for cls in classes:
        jobs += [(cls, "train", "good", p) for p in _images(root / cls / "train" / "good")]
        test = root / cls / "test"
        if not test.is_dir():
            raise CcnfError(f"class '{cls}' has no test folder: {test}", where=str(root))
        for defect_dir in sorted(d for d in test.iterdir() if d.is_dir()):
            jobs += [(cls, "test", defect_dir.name, p) for p in _images(defect_dir)]
    records = [
        make_record(root, cls, split, defect, image,
                    None if defect == "good" else _mask_for(root, cls, defect, image))
        for cls, split, defect, image in track(
            jobs, description="indexing images", disable=not progress, transient=True
        )
    ]
    check_counts(records, classes, root)
    return Manifest(str(root), records)
