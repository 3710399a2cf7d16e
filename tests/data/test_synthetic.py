"""The embedded synthetic dataset: MVTec layout, exact masks, determinism, atomic output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccnf.config import SyntheticConfig
from ccnf.data import synthetic
from ccnf.data.synthetic import (
    CLASS_INFO,
    DEFECT_KINDS,
    SYNTHETIC_CLASSES,
    SYNTHETIC_SPLIT,
    generate,
    render_sample_grid,
)

# one defective image per defect kind (every class has 4 kinds), small images: ~2 s per set
TINY = SyntheticConfig(image_size=64, n_train=4, n_test_good=2, n_test_defect=4, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate(root, TINY, progress=False)
    return root


def test_synthetic_classes_and_split_are_consistent() -> None:
    assert len(SYNTHETIC_CLASSES) == 15 == len(set(SYNTHETIC_CLASSES))
    flat = [c for task in SYNTHETIC_SPLIT for c in task]
    assert len(SYNTHETIC_SPLIT) == 5 and all(len(t) == 3 for t in SYNTHETIC_SPLIT)
    assert sorted(flat) == sorted(SYNTHETIC_CLASSES)  # a partition
    task_of = {c: i for i, task in enumerate(SYNTHETIC_SPLIT) for c in task}
    used_kinds = set()
    for cls, info in CLASS_INFO.items():
        assert set(info.defects) <= set(DEFECT_KINDS) and len(info.defects) >= 3
        used_kinds |= set(info.defects)
        for other in info.near_duplicates:
            assert other in CLASS_INFO and other != cls
            # near-duplicates must arrive in different tasks
            assert task_of[other] != task_of[cls], (cls, other)
    assert used_kinds == set(DEFECT_KINDS)
    assert {i.kind for i in CLASS_INFO.values()} == {"texture", "object"}
    assert {i.colour for i in CLASS_INFO.values()} == {"rgb", "gray"}


def test_synthetic_layout_matches_mvtec(tiny_root: Path) -> None:
    for cls in SYNTHETIC_CLASSES:
        info = CLASS_INFO[cls]
        base = tiny_root / cls
        assert len(list((base / "train" / "good").glob("*.png"))) == TINY.n_train
        assert len(list((base / "test" / "good").glob("*.png"))) == TINY.n_test_good
        defect_dirs = sorted(d.name for d in (base / "test").iterdir() if d.name != "good")
        assert defect_dirs == sorted(info.defects)
        # ground truth exists only for defect types, never for good images
        assert sorted(d.name for d in (base / "ground_truth").iterdir()) == defect_dirs
        n_defect = 0
        for kind in defect_dirs:
            for image in sorted((base / "test" / kind).glob("*.png")):
                n_defect += 1
                mask_path = base / "ground_truth" / kind / f"{image.stem}_mask.png"
                img, mask = Image.open(image), Image.open(mask_path)
                assert img.size == mask.size == (TINY.image_size, TINY.image_size)
                assert img.mode == ("L" if info.colour == "gray" else "RGB")
                assert mask.mode == "L"
                m = np.asarray(mask)
                assert set(np.unique(m).tolist()) <= {0, 255}
                assert (m == 255).sum() > 0, f"empty mask {mask_path}"
            masks = list((base / "ground_truth" / kind).glob("*"))
            assert len(masks) == len(list((base / "test" / kind).glob("*.png")))
        assert n_defect == TINY.n_test_defect


def test_synthetic_generation_is_deterministic(tiny_root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, TINY, progress=False)
    assert _files(again) == _files(tiny_root)


def test_synthetic_worker_count_does_not_change_output(tiny_root: Path, tmp_path: Path) -> None:
    two = tmp_path / "two"
    generate(two, TINY, progress=False, workers=2)
    assert _files(two) == _files(tiny_root)


def test_synthetic_images_do_not_depend_on_set_size(tiny_root: Path, tmp_path: Path) -> None:
    # every image has its own seed: adding images leaves the existing ones unchanged
    bigger = tmp_path / "bigger"
    generate(bigger, TINY.model_copy(update={"n_train": 6, "n_test_defect": 8}), progress=False)
    small, large = _files(tiny_root), _files(bigger)
    assert all(large[name] == data for name, data in small.items())
    assert len(large) > len(small)


def test_synthetic_seeds_differ(tiny_root: Path, tmp_path: Path) -> None:
    other = tmp_path / "seed1"
    generate(other, TINY.model_copy(update={"seed": 1}), progress=False)
    a, b = _files(tiny_root), _files(other)
    assert a.keys() == b.keys()
    assert all(a[n] != b[n] for n in a if n.endswith(".png") and "/train/" in n)


def test_synthetic_summary_counts(tmp_path: Path) -> None:
    summary = generate(tmp_path / "d", TINY, progress=False)
    assert summary["n_classes"] == 15
    assert summary["n_images"] == 15 * (TINY.n_train + TINY.n_test_good + TINY.n_test_defect)
    for cls, entry in summary["classes"].items():
        assert entry["train"] == TINY.n_train
        assert sum(entry["defects"].values()) == TINY.n_test_defect
        assert set(entry["defects"]) == set(CLASS_INFO[cls].defects)


def test_synthetic_regeneration_replaces_the_directory(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "stale.txt").write_text("left from an old run")
    generate(root, TINY, progress=False)
    assert not (root / "stale.txt").exists()
    assert sorted(p.name for p in root.iterdir()) == sorted(SYNTHETIC_CLASSES)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary left over


def test_synthetic_interrupted_generation_leaves_old_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "old.txt").write_text("previous dataset")
    calls = {"n": 0}
    real = synthetic.writer._write_one

    def failing(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(synthetic.writer, "_write_one", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(root, TINY, progress=False, workers=1)
    assert [p.name for p in root.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize("cls", SYNTHETIC_CLASSES)
def test_synthetic_every_defect_kind_places_at_small_size(cls: str) -> None:
    for kind in CLASS_INFO[cls].defects:
        for seed in range(3):
            img, mask = synthetic.synthesize(cls, 64, np.random.default_rng(seed), kind)
            assert mask is not None and mask.shape == (64, 64) and mask.any()
            assert img.shape[:2] == (64, 64) and img.dtype == np.uint8
    img, mask = synthetic.synthesize(cls, 64, np.random.default_rng(0))
    assert mask is None


def test_synthetic_sample_grid(tiny_root: Path, tmp_path: Path) -> None:
    out = render_sample_grid(tiny_root, tmp_path / "grid.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 15 * 50
