"""Stored artefacts: exact round trips, and every kind of damage is one clear error.

Checkpoints and feature caches (:mod:`ccnf.store`), evaluation outputs (``.npz``), JSON, and
the atomic writer under a full disk. Bit flips are exhaustive (every bit of a small artefact),
truncations cover every length: each either raises one :class:`CcnfError` naming the file or
(never seen, but allowed) gives back exactly what was saved.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ccnf.store as store
from ccnf.atomic import atomic_path, remove_stale_temporaries, write_json
from ccnf.data.manifest import Manifest
from ccnf.errors import CcnfError
from ccnf.features import load_split
from ccnf.models import read_checkpoint
from ccnf.store import (
    dumps,
    load_artifact,
    load_npz,
    loads,
    read_json,
    save_artifact,
    save_npz,
)

REPO = Path(__file__).resolve().parents[2]


def _same(a: object, b: object) -> bool:
    """Deep equality that also compares types, dtypes and tensor bits (NaN == NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                                b.view(-1).view(torch.uint8) if b.numel() else b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def _sample() -> dict:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    return {
        "state_dict": {"flow.0.weight": base, "flow.0.view": base[1:3],  # shares storage
                       "step": torch.tensor(7), "half": torch.randn(3, generator=gen).half(),
                       "bf16": torch.randn(2, 2, generator=gen).bfloat16()},
        "channels": [40, 112], "grids": [[8, 8], [4, 4]], "n_classes": 3,
        "classes": ["a", "b", "c"], "task": 2, "spec": {"eps": 0.01, "sn": True, "w": None},
        "calibration": {"a": {"nf": [torch.randn(2, 1, 8, 8, generator=gen)],
                              "proto_image": torch.zeros(0)}},
        "replay": {"a": [0, 3], "b": []}, "shape": (2, 3), "by_id": {0: "a", 1: "b"},
        "reserved": {"__tensor__": "not a tensor"}, "nan": float("nan"), "inf": -float("inf"),
        "mask": torch.tensor([[True, False]]), "text": "ünïcode ✓",
    }


def test_round_trip_is_exact_for_every_supported_value() -> None:
    obj = _sample()
    back = loads(dumps(obj, kind="checkpoint"), kind="checkpoint")
    assert _same(obj, back)
    assert isinstance(back["shape"], tuple) and list(back["by_id"]) == [0, 1]


def test_bytes_depend_only_on_the_content() -> None:
    """DVC hashes the files: the same content must give the same bytes in any process."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            "from tests.faults.test_artifacts import _sample; from ccnf.store import dumps; "
            "sys.stdout.buffer.write(dumps(_sample(), kind='checkpoint'))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert other == dumps(_sample(), kind="checkpoint")


@pytest.mark.parametrize("value", [np.zeros(3), object(), {(1, 2): "tuple key"}, torch.float32])
def test_values_that_would_not_come_back_unchanged_are_refused(value: object) -> None:
    with pytest.raises(TypeError, match="cannot store"):
        dumps({"x": value}, kind="checkpoint")


def test_every_single_bit_flip_is_detected(faults) -> None:
    obj = {"state_dict": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
           "classes": ["a"], "calibration": {"a": {"nf": [torch.ones(2, 1, 2, 2)]}}}
    data = dumps(obj, kind="checkpoint")
    silent = []
    for i in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            try:
                back = loads(bytes(damaged), kind="checkpoint", where="x/model.pt")
            except CcnfError as err:
                assert "x/model.pt" in err.render()
                continue
            if not _same(back, obj):
                silent.append((i, bit))
    faults.inject("bit flip", len(data) * 8)
    assert faults.check(silent == [], f"silently changed by bit flips at {silent[:5]}")


def test_every_truncation_is_detected(faults) -> None:
    data = dumps({"features": [torch.ones(2, 3, 2, 2).half()], "names": ["x", "y"]},
                 kind="features")
    for n in range(len(data)):
        with pytest.raises(CcnfError, match=r"truncated, corrupt|corrupt|empty"):
            loads(data[:n], kind="features", where="f.pt")
    faults.inject("truncation", len(data))
    faults.check(True, "every prefix refused")


class _Boom:
    """Unpickling this object runs code: it would create the file named by ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_a_malicious_pickle_checkpoint_is_refused_without_running_code(
    tmp_path: Path, faults
) -> None:
    """Finding 4: checkpoints were loaded with torch.load(weights_only=False), so a
    checkpoint from a shared remote could run code. The old loader creates ``marker``."""
    marker = tmp_path / "pwned"
    (tmp_path / "models/t0").mkdir(parents=True)
    torch.save({"state_dict": {}, "x": _Boom(str(marker))}, tmp_path / "models/t0/model.pt")
    faults.inject("malicious pickle")
    with pytest.raises(CcnfError, match="torch pickle") as info:
        read_checkpoint(tmp_path / "models/t0")
    assert "dvc repro --force --single-item train@t0" in info.value.render()
    assert faults.check(not marker.exists(), "code ran while loading a checkpoint")


def test_a_malicious_pickle_feature_file_is_refused_without_running_code(
    tmp_path: Path, faults
) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "features/a").mkdir(parents=True)
    with open(tmp_path / "features/a/train.pt", "wb") as fh:
        pickle.dump({"features": _Boom(str(marker))}, fh)  # a legacy (non-zip) pickle
    faults.inject("malicious pickle")
    with pytest.raises(CcnfError, match="torch pickle"):
        load_split(tmp_path / "features", "a", "train")
    assert faults.check(not marker.exists(), "code ran while loading features")


def test_no_pickle_loading_anywhere_in_the_code() -> None:
    """Must-show 3: no weights_only=False, allow_pickle=True or pickle.load in the code."""
    bad = []
    for path in [*REPO.glob("ccnf/**/*.py"), *REPO.glob("stages/*.py"),
                 *REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/*")]:
        text = path.read_text(encoding="utf-8", errors="replace")
        for needle in ("weights_only=False", "allow_pickle=True", "pickle.load",
                       "pickle.Unpickler", "torch.load(f"):
            if needle in text.replace(" ", ""):
                bad.append(f"{path.relative_to(REPO)}: {needle}")
    assert bad == []


def test_wrong_kind_foreign_file_and_old_version_are_named(tmp_path: Path,
                                                          monkeypatch, faults) -> None:
    features = tmp_path / "features/a/train.pt"
    save_artifact(features, {"features": [], "names": []}, kind="features")
    with pytest.raises(CcnfError, match="holds a 'features' artefact, not a checkpoint"):
        load_artifact(features, kind="checkpoint", fix="f")
    foreign = tmp_path / "foreign.pt"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(CcnfError, match="safetensors file not written by ccnf"):
        load_artifact(foreign, kind="checkpoint", fix="f")
    monkeypatch.setitem(store.KIND_VERSIONS, "checkpoint", 0)
    old = dumps({"x": 1}, kind="checkpoint")
    monkeypatch.setitem(store.KIND_VERSIONS, "checkpoint", 1)
    with pytest.raises(CcnfError, match="format version 1/0, this code reads 1/1"):
        loads(old, kind="checkpoint")
    for name, data in (("empty", b""), ("random", os.urandom(300)), ("text", b"hello\n")):
        with pytest.raises(CcnfError, match=r"empty|truncated, corrupt"):
            loads(data, kind="features", where=name)
    faults.inject("foreign, wrong-kind or old file", 6)


@pytest.mark.parametrize(
    "damage", ["truncated", "bit flip", "needs pickle", "no manifest", "wrong kind"]
)
def test_evaluation_outputs_are_read_without_pickle_and_checked(
    tmp_path: Path, damage: str, faults
) -> None:
    path = tmp_path / "eval" / "t1" / "image_scores.npz"
    arrays = {"a/labels": np.array([0, 1, 1]), "a/nf": np.linspace(0, 1, 3),
              "name": np.array("a/test/hole/000.png")}
    save_npz(path, arrays, kind="image_scores")
    back = load_npz(path, kind="image_scores", what="image scores")
    assert list(back) == list(arrays) and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    assert set(np.load(path).files) == {*arrays, "__ccnf__"}  # still a plain numpy archive
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:-20])
    elif damage == "bit flip":
        path.write_bytes(_flip_member_data(data))
    elif damage == "needs pickle":
        np.savez_compressed(path, obj=np.array([{"x": 1}], dtype=object))
    elif damage == "no manifest":
        np.savez_compressed(path, **arrays)
    else:
        save_npz(path, arrays, kind="gallery")
    faults.inject("damaged npz", detail=damage)
    with pytest.raises(CcnfError) as info:
        load_npz(path, kind="image_scores", what="image scores")
    msg = info.value.render()
    assert str(path) in msg and "evaluate@t1" in msg
    with pytest.raises(TypeError, match="without pickle"):
        save_npz(path, {"obj": np.array([None], dtype=object)}, kind="image_scores")


def _flip_member_data(data: bytes) -> bytes:
    """Flip one bit inside the compressed data of the first zip member."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    damaged = bytearray(data)
    damaged[start + info.compress_size // 2] ^= 0x04
    return bytes(damaged)


def test_bit_flips_in_every_byte_of_an_npz_are_detected_or_harmless(
    tmp_path: Path, faults
) -> None:
    path = tmp_path / "s.npz"
    arrays = {"a/labels": np.array([0, 1]), "a/nf": np.array([0.25, 0.5])}
    save_npz(path, arrays, kind="image_scores")
    data, silent = path.read_bytes(), []
    flips = [(i, (i + k) % 8) for i in range(len(data)) for k in (0, 4)]  # 2 bits of each byte
    for i, bit in flips:
        damaged = bytearray(data)
        damaged[i] ^= 1 << bit
        path.write_bytes(bytes(damaged))
        try:
            back = load_npz(path, kind="image_scores", what="scores")
        except CcnfError:
            continue
        # zip fields outside the data (timestamps, version numbers, attributes) may
        # change; the arrays may not
        if list(back) != list(arrays) or not all(
            back[k].dtype == arrays[k].dtype and np.array_equal(back[k], arrays[k])
            for k in arrays
        ):
            silent.append((i, bit))
    faults.inject("bit flip", len(flips))
    assert faults.check(silent == [], f"npz silently changed by bit flips at {silent[:5]}")


def test_json_artefacts_damaged_are_one_error(tmp_path: Path, faults) -> None:
    manifest = tmp_path / "data" / "manifest.json"
    Manifest(str(tmp_path), []).save(manifest)
    manifest.write_text(manifest.read_text()[:-5])
    with pytest.raises(CcnfError, match="truncated or corrupt") as info:
        Manifest.load(manifest)
    assert "dvc repro --force --single-item prepare" in info.value.render()
    manifest.write_text(json.dumps({"root": "x", "records": [{"cls": "a"}]}))
    with pytest.raises(CcnfError, match="unexpected content"):
        Manifest.load(manifest)
    metrics = tmp_path / "metrics" / "tasks" / "t0.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_bytes(b"\xff\xfe{")
    with pytest.raises(CcnfError, match="evaluate@t0"):
        read_json(metrics, what="evaluation")
    faults.inject("damaged JSON", 3)


# ----------------------------------------------------------------------------- full disk


def _disk_full_after(n_bytes: int, monkeypatch) -> list[Path]:
    """Make Path.write_bytes/write_text write ``n_bytes`` then fail with ENOSPC."""
    touched: list[Path] = []
    real = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        touched.append(self)
        real(self, bytes(data[:n_bytes]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text",
                        lambda self, text, *a, **k: write_bytes(self, text.encode()))
    return touched


@pytest.mark.parametrize("existing", [False, True])
def test_full_disk_during_an_artefact_write_leaves_no_half_file(
    tmp_path: Path, monkeypatch, existing: bool, faults
) -> None:
    target = tmp_path / "models" / "t0" / "model.pt"
    old = {"w": torch.zeros(3)}
    if existing:
        save_artifact(target, old, kind="checkpoint")
    before = sorted(p.name for p in target.parent.iterdir()) if existing else None
    touched = _disk_full_after(100, monkeypatch)
    with pytest.raises(CcnfError, match=r"no room to write .*model\.pt.*No space left"):
        save_artifact(target, {"w": torch.ones(1000)}, kind="checkpoint")
    monkeypatch.undo()
    faults.inject("disk full")
    assert touched and touched[0] != target  # the bytes went to a temporary, never the target
    if existing:
        ok = _same(load_artifact(target, kind="checkpoint", fix=""), old)
        ok = ok and sorted(p.name for p in target.parent.iterdir()) == before
    else:
        ok = not target.exists() and list(target.parent.iterdir()) == []
    assert faults.check(ok, "artefact after a full disk")


def test_full_disk_in_a_directory_output_keeps_the_old_directory(
    tmp_path: Path, monkeypatch, faults
) -> None:
    out = tmp_path / "eval" / "t0"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a.json").write_text("old a")
        (tmp / "b.json").write_text("old b")
    real = Path.write_text

    def second_write_fails(self: Path, text: str, *a, **k) -> int:
        if self.name == "b.json":
            real(self, text[:2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", second_write_fails)
    with pytest.raises(CcnfError, match="no room"), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a.json").write_text("new a")
        (tmp / "b.json").write_text("new b")
    monkeypatch.undo()
    faults.inject("disk full")
    ok = {p.name: p.read_text() for p in out.iterdir()} == {"a.json": "old a", "b.json": "old b"}
    ok = ok and sorted(p.name for p in out.parent.iterdir()) == ["t0"]
    assert faults.check(ok, "directory output after a full disk")


def test_write_json_full_disk(tmp_path: Path, monkeypatch, faults) -> None:
    _disk_full_after(3, monkeypatch)
    with pytest.raises(CcnfError, match="no room"):
        write_json(tmp_path / "metrics" / "summary.json", {"a": 1})
    monkeypatch.undo()
    faults.inject("disk full")
    assert faults.check(list((tmp_path / "metrics").iterdir()) == [], "summary.json")


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "features"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".features.{int(dead.stdout)}.abc.tmp"
    stale.mkdir()
    (stale / "half.pt").write_bytes(b"xx")
    live = tmp_path / f".features.{os.getppid()}.def.tmp"
    live.write_text("a writer still at work")
    other = tmp_path / f".features2.{int(dead.stdout)}.x.tmp"
    other.write_text("another target's")
    assert remove_stale_temporaries(target) == [stale]
    assert live.exists() and other.exists()
