"""The typed records between evaluate and aggregate: their file layout round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ccnf.errors import CcnfError
from ccnf.records import ClassScores, GalleryItem, TaskResult
from ccnf.store import load_npz, save_npz


def test_class_scores_round_trip_through_the_npz(tmp_path: Path) -> None:
    a = ClassScores(np.array([0, 1]), {"nf": np.array([0.1, 0.9]), "latent": np.array([1., 2.])},
                    selected=np.array([0, 1]), agnostic={"nf": np.array([0.2, 0.8])})
    b = ClassScores(np.array([1, 0]), {"nf": np.array([0.5, 0.4]), "latent": np.array([3., 4.])})
    path = tmp_path / "image_scores.npz"
    save_npz(path, a.to_arrays("a") | b.to_arrays("b"), kind="image_scores")
    arrays = load_npz(path, kind="image_scores", what="image scores")
    assert list(arrays)[:5] == ["a/labels", "a/nf", "a/latent", "a/selected", "a/agnostic/nf"]
    back = ClassScores.from_arrays(arrays, "a", ["nf", "latent"], path)
    np.testing.assert_array_equal(back.selected, a.selected)
    np.testing.assert_array_equal(back.agnostic["nf"], a.agnostic["nf"])
    other = ClassScores.from_arrays(arrays, "b", ["nf"], path)
    assert other.selected is None and other.agnostic == {} and list(other.scores) == ["nf"]
    with pytest.raises(CcnfError, match="lacks c/labels"):
        ClassScores.from_arrays(arrays, "c", ["nf"], path)


def test_gallery_items_come_back_in_class_and_index_order(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), dtype=bool)
    items = [GalleryItem(c, k, f"{c}/test/hole/{k:03d}.png", mask, {"nf": np.full((4, 4), k)})
             for c in ("b", "a") for k in range(11)]
    arrays = {k: v for item in items for k, v in item.to_arrays().items()}
    back = GalleryItem.read_all(arrays, ["a", "b"], ["nf"], tmp_path / "g.npz")
    assert [(i.cls, i.index) for i in back] == [(c, k) for c in "ab" for k in range(11)]
    assert back[1].name == "a/test/hole/001.png" and list(back[10].maps) == ["nf"]
    assert float(back[10].maps["nf"][0, 0]) == 10.0  # "a/1/" does not swallow "a/10/"
    with pytest.raises(CcnfError, match="lacks a/0/proto"):
        GalleryItem.read_all(arrays, ["a"], ["proto"], tmp_path / "g.npz")


def test_task_result_names_what_is_wrong(tmp_path: Path) -> None:
    good = TaskResult("t1", 1, "oracle", {}, {"a": {}}, {"t0": {}}, {"same_as_aware": True})
    assert TaskResult.from_json(good.to_json(), tmp_path, "t1") == good
    with pytest.raises(CcnfError, match="it is of t1"):
        TaskResult.from_json(good.to_json(), tmp_path, "t0")
    raw = good.to_json()
    del raw["agnostic"]
    with pytest.raises(CcnfError, match="predates the task-agnostic"):
        TaskResult.from_json(raw, tmp_path, "t1")
    with pytest.raises(CcnfError, match="missing task, task_index"):
        TaskResult.from_json([], tmp_path, "t1")


def test_an_npz_has_no_header_that_depends_on_the_interpreter(tmp_path: Path) -> None:
    # numpy's own writer streams members with force_zip64, and zipfile's zip64 header for
    # that changed between Python 3.11 patch releases: the same arrays became different
    # bytes (and different DVC hashes) under 3.11.2 and 3.11.7
    import zipfile

    arrays = {"a/nf": np.linspace(0, 1, 1000), "a/labels": np.arange(1000) % 2}
    first, second = tmp_path / "1.npz", tmp_path / "2.npz"
    save_npz(first, arrays, kind="image_scores")
    save_npz(second, arrays, kind="image_scores")
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == ["a/nf.npy", "a/labels.npy", "__ccnf__.npy"]
    for info in infos:
        assert info.extra == b"" and info.extract_version == 20, info.filename  # no zip64
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.compress_type == zipfile.ZIP_DEFLATED
    with np.load(first, allow_pickle=False) as npz:  # still a plain numpy archive
        np.testing.assert_array_equal(npz["a/nf"], arrays["a/nf"])
