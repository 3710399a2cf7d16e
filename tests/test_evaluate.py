"""evaluate_task: task-aware and task-agnostic blocks, class selection, automatic thresholds.

A tiny study is built directly on disk (feature cache + checkpoints of a small CCNF), so the
evaluation runs in about a second without a backbone or training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_params

import ccnf.models.ccnf as ccnf_model_module
from ccnf.atomic import write_json
from ccnf.config import Params, parse_params
from ccnf.errors import CcnfError
from ccnf.evaluate import evaluate_task
from ccnf.flows import CCNF
from ccnf.metrics import precision_recall_f1_at
from ccnf.models import read_checkpoint
from ccnf.models.ccnf import CCNFModel, ccnf_spec
from ccnf.models.ccnf_scores import ClassStatistics, calibration_patches, patch_scores
from ccnf.names import ALL_METRICS, SCORES
from ccnf.scoring import (
    assemble,
    calibration_record,
    fusion_stats_of,
    image_scores,
    stack_stats,
    thresholds,
)
from ccnf.store import load_artifact, save_artifact

SPLIT = [["a", "b"], ["c", "d"]]
CHANNELS, GRIDS = [5, 6], [[4, 4], [2, 2]]
N_GOOD, N_BAD, N_TRAIN = 3, 3, 5


def _features(gen: torch.Generator, n: int, shift: float) -> list[torch.Tensor]:
    return [
        shift + torch.randn(n, d, h, w, generator=gen)
        for d, (h, w) in zip(CHANNELS, GRIDS, strict=True)
    ]


def build_study(
    root: Path, raw_overrides: dict[str, dict[str, Any]] | None = None,
    task_split: list[list[str]] = SPLIT,
) -> Params:
    """Feature cache in root/features, checkpoints root/models/t0 and t1; returns the params.

    Classes differ by a feature offset; defective test images get a bright 2x2 patch (level
    0) and their masks mark the matching quarter of the image.
    """
    raw = tiny_params(root / "data", task_split)
    raw["eval"].update(batch_images=4, gallery_per_class=1)
    for section, values in (raw_overrides or {}).items():
        raw[section].update(values)
    params = parse_params(raw)
    size = params.data.mask_size
    gen = torch.Generator().manual_seed(0)
    for k, cls in enumerate(params.classes):
        shift = 0.5 * k
        train = _features(gen, N_TRAIN, shift)
        n = N_GOOD + N_BAD
        test = _features(gen, n, shift)
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for i in range(N_GOOD, n):
            test[0][i, :, :2, :2] += 4.0
            masks[i, : size // 2, : size // 2] = True
        labels = torch.tensor([0] * N_GOOD + [1] * N_BAD)
        for split, feats, lab, m in (
            ("train", train, torch.zeros(N_TRAIN, dtype=torch.long), None),
            ("test", test, labels, masks),
        ):
            path = root / "features" / cls / f"{split}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            names = [f"{cls}/{split}/{i:03d}.png" for i in range(len(lab))]
            save_artifact(
                path,
                {"features": [f.half() for f in feats], "names": names, "labels": lab,
                 "defects": ["good" if v == 0 else "hole" for v in lab.tolist()], "masks": m},
                kind="features",
            )
    write_json(root / "features" / "meta.json", {
        "backbone": "test", "out_indices": [0, 1], "channels": CHANNELS, "strides": [1, 2],
        "grids": GRIDS, "image_size": size, "mask_size": size, "classes": params.classes,
    })
    torch.manual_seed(0)
    model = CCNF(CHANNELS, GRIDS, ccnf_spec(params.flow, CHANNELS), n_classes=0)
    calibration: dict[str, Any] = {}
    for t, task in enumerate(params.task_names):
        model.add_classes(len(task_split[t]))
        for cls in task_split[t]:
            train = load_artifact(root / "features" / cls / "train.pt", kind="features", fix="")
            cid = params.classes.index(cls)
            calibration[cls] = calibration_patches(model, train["features"], cid, 4)
        out = root / "models" / task
        out.mkdir(parents=True, exist_ok=True)
        seen = [c for j in range(t + 1) for c in task_split[j]]
        save_artifact(out / "model.pt",
                      CCNFModel(model, seen, torch.device("cpu")).checkpoint(
                          task=t, calibration=dict(calibration)),
                      kind="checkpoint")
    return params


def _stats(ckpt: dict, cls: str, params: Params) -> dict:
    """The statistics evaluation derives from the checkpoint's calibration patch scores."""
    return calibration_record(ckpt["calibration"][cls], params.score, params.data.mask_size)


def run(root: Path, params: Params, task: str = "t1", name: str = "run") -> dict[str, Any]:
    return evaluate_task(
        params, task, root / "features", root / "models" / task,
        root / name / "metrics" / f"{task}.json", root / name / "eval" / task,
    )


def with_select(params: Params, method: str, **eval_or_score: Any) -> Params:
    raw = params.model_dump()
    raw["score"]["class_select"] = method
    for key, value in eval_or_score.items():
        section = "eval" if key.startswith("threshold") else "score"
        raw[section][key] = value
    return parse_params(raw)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    root = tmp_path_factory.mktemp("evaluate")
    return root, build_study(root)


def test_oracle_agnostic_block_is_the_aware_one_and_aware_never_changes(study) -> None:
    root, params = study
    oracle = run(root, with_select(params, "oracle"), name="oracle")
    assert oracle["agnostic"] == {
        "class_select": "oracle", "same_as_aware": True, "selection_accuracy": 1.0
    }
    assert oracle["timing_s"]["selection"] == 0.0  # no selection pass
    on_disk = json.loads((root / "oracle/metrics/t1.json").read_text())
    assert "timing_s" not in on_disk and on_disk["agnostic"]["same_as_aware"] is True
    lik = run(root, with_select(params, "likelihood"), name="lik")
    # the task-aware block does not depend on the selection method
    assert lik["per_class"] == oracle["per_class"]
    assert lik["per_task"] == oracle["per_task"]
    assert lik["agnostic"]["same_as_aware"] is False
    for entry in lik["per_class"].values():
        for score in SCORES:
            assert set(entry[score]) == set(ALL_METRICS)
            assert all(0.0 <= v <= 1.0 for v in entry[score].values())


def test_selection_accuracy_and_agnostic_scores_against_direct_computation(
    study, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, params = study
    raw_params = with_select(params, "prototype").model_dump()
    raw_params["eval"]["workers"] = 1  # the fake selection below counts its calls in-process
    params = parse_params(raw_params)
    # a fixed selection: class a gets image 4 wrong (as d), b all right, c two wrong (as a),
    # d all right
    n = N_GOOD + N_BAD
    wrong = {"a": {4: 3}, "b": {}, "c": {0: 0, 5: 0}, "d": {}}
    calls: list[str] = []

    def fixed_selection(
        model: CCNF, features: list[torch.Tensor], candidates: torch.Tensor, batch_images: int,
        level: int | None = -1,
    ) -> ClassStatistics:
        cls = "abcd"[len(calls)]
        calls.append(cls)
        cid = params.classes.index(cls)
        pick = np.array([wrong[cls].get(i, cid) for i in range(n)])
        dist = np.ones((n, len(candidates)))
        dist[np.arange(n), pick] = 0.0
        return ClassStatistics(np.arange(len(candidates)), log_lik=-dist, proto_dist=dist)

    monkeypatch.setattr(ccnf_model_module, "class_statistics", fixed_selection)
    res = run(root, params, name="fixed")
    agn = res["agnostic"]
    acc = {cls: agn["per_class"][cls]["selection_accuracy"] for cls in "abcd"}
    assert acc == pytest.approx({"a": 5 / 6, "b": 1.0, "c": 4 / 6, "d": 1.0}, abs=1e-6)
    assert agn["per_task"]["t0"]["selection_accuracy"] == pytest.approx((5 / 6 + 1) / 2, abs=1e-6)
    assert agn["per_task"]["t1"]["selection_accuracy"] == pytest.approx((4 / 6 + 1) / 2, abs=1e-6)
    assert agn["selection_accuracy"] == pytest.approx((5 / 6 + 1 + 4 / 6 + 1) / 4, abs=1e-6)
    assert agn["per_class"]["a"]["selected"] == {"a": 5, "d": 1}
    assert agn["per_class"]["c"]["selected"] == {"a": 2, "c": 4}
    # classes selected right throughout: agnostic metrics are the task-aware ones
    for cls in "bd":
        for score in SCORES:
            assert agn["per_class"][cls][score] == res["per_class"][cls][score]
    # class c: images 0 and 5 scored under class a, with a's calibration and a's thresholds
    ckpt = read_checkpoint(root / "models/t1")
    model = CCNF.from_checkpoint(ckpt, ccnf_spec(params.flow, ckpt["channels"]))
    feats = load_artifact(root / "features/c/test.pt", kind="features", fix="")
    ids = torch.tensor([0, 2, 2, 2, 2, 0])
    names = ["a", "c", "c", "c", "c", "a"]
    per_image = stack_stats({c: _stats(ckpt, c, params) for c in "ac"}, names)
    s = assemble(patch_scores(model, feats["features"], ids, 4), params.score,
                 params.data.mask_size, fusion_stats_of(per_image))
    raw = np.load(root / "fixed/eval/t1/image_scores.npz")
    np.testing.assert_array_equal(raw["c/selected"], ids.numpy())
    labels = feats["labels"].numpy()
    for i, cls in enumerate(names):
        want = image_scores(s, _stats(ckpt, cls, params), params.score.alpha)
        for score in SCORES:
            assert raw[f"c/agnostic/{score}"][i] == pytest.approx(want[score][i], rel=1e-5)
    thr = {c: thresholds(_stats(ckpt, c, params), params.score.alpha, False,
                         params.eval.threshold_k, params.eval.threshold_percentile)
           for c in ("a", "c")}
    names = ["a", "c", "c", "c", "c", "a"]
    for score in SCORES:
        values = raw[f"c/agnostic/{score}"]
        for kind in ("kstd", "pct"):
            pred = np.array([values[i] >= thr[c][score][kind] for i, c in enumerate(names)])
            tp = int(np.sum(pred & (labels == 1)))
            precision = tp / pred.sum() if pred.sum() else 0.0
            recall = tp / (labels == 1).sum()
            got = agn["per_class"]["c"][score]
            assert got[f"image_precision_{kind}"] == pytest.approx(precision, abs=1e-6)
            assert got[f"image_recall_{kind}"] == pytest.approx(recall, abs=1e-6)


def test_threshold_metrics_against_direct_computation(study) -> None:
    root, params = study
    for k, pct in ((3.0, 99.0), (0.0, 50.0)):  # the second makes some predictions positive
        p = with_select(params, "oracle", threshold_k=k, threshold_percentile=pct)
        res = run(root, p, name=f"thr{k}")
        ckpt = read_checkpoint(root / "models/t1")
        raw = np.load(root / f"thr{k}/eval/t1/image_scores.npz")
        for cls, entry in res["per_class"].items():
            thr = thresholds(_stats(ckpt, cls, p), p.score.alpha, False, k, pct)
            assert res["thresholds"]["per_class"][cls]["nf"]["kstd"] == pytest.approx(
                thr["nf"]["kstd"], abs=1e-6
            )
            for score in SCORES:
                for kind, tag in (("kstd", "kstd"), ("pct", "pct")):
                    want = precision_recall_f1_at(
                        raw[f"{cls}/labels"], raw[f"{cls}/{score}"], thr[score][kind]
                    )
                    got = [entry[score][f"image_{m}_{tag}"] for m in ("precision", "recall", "f1")]
                    assert got == pytest.approx(list(want), abs=1e-6)
                    # the fraction of normal test images the threshold flags
                    labels, values = raw[f"{cls}/labels"], raw[f"{cls}/{score}"]
                    flagged = np.mean(values[labels == 0] >= thr[score][kind])
                    assert entry[score][f"image_normal_flagged_{kind}"] == pytest.approx(
                        flagged, abs=1e-6)
                # chance levels: AP of a random ranking = the defect rate; F1 of flagging all
                rate = float(np.mean(raw[f"{cls}/labels"]))
                assert entry[score]["image_ap_chance"] == pytest.approx(rate, abs=1e-6)
                everything = np.zeros_like(raw[f"{cls}/{score}"])
                f1_all = precision_recall_f1_at(raw[f"{cls}/labels"], everything, 0.0)[2]
                assert entry[score]["image_f1_all"] == pytest.approx(f1_all, abs=1e-6)


def test_calibrated_scores_leave_oracle_ranking_metrics_unchanged(study) -> None:
    root, params = study
    plain = run(root, with_select(params, "oracle"), name="plain")
    cal = run(root, with_select(params, "oracle", calibrated=True), name="cal")
    raw = np.load(root / "cal/eval/t1/image_scores.npz")
    ckpt = read_checkpoint(root / "models/t1")
    stats = _stats(ckpt, "a", params)["nf_image"]
    plain_raw = np.load(root / "plain/eval/t1/image_scores.npz")
    np.testing.assert_allclose(raw["a/nf"], (plain_raw["a/nf"] - stats[0]) / stats[1])
    for cls in plain["per_class"]:
        for score in SCORES:
            for metric, value in plain["per_class"][cls][score].items():
                assert cal["per_class"][cls][score][metric] == pytest.approx(value, abs=1e-5)


def test_checkpoint_without_calibration_patches_asks_for_repro(tmp_path: Path) -> None:
    params = build_study(tmp_path)
    path = tmp_path / "models/t1/model.pt"
    ckpt = read_checkpoint(path.parent)
    for cls in ckpt["calibration"]:  # a record of statistics, as older checkpoints held
        ckpt["calibration"][cls] = {"nf_image": [0.0, 1.0]}
    save_artifact(path, ckpt, kind="checkpoint")
    with pytest.raises(CcnfError, match="dvc repro") as info:
        run(tmp_path, params)
    assert "predates this version" in str(info.value)
    assert not (tmp_path / "run/metrics/t1.json").exists()


def test_worker_pool_gives_the_same_results_as_one_process(study) -> None:
    root, params = study
    raw = with_select(params, "prototype").model_dump()
    results, arrays = [], []
    for workers in (1, 3):
        raw["eval"]["workers"] = workers
        res = run(root, parse_params(raw), name=f"workers{workers}")
        res.pop("timing_s")
        results.append(res)
        npz = np.load(root / f"workers{workers}" / "eval" / "t1" / "image_scores.npz")
        arrays.append({k: npz[k] for k in npz.files})
    assert results[0] == results[1]
    assert list(arrays[0]) == list(arrays[1])
    assert all(np.array_equal(arrays[0][k], arrays[1][k]) for k in arrays[0])
    assert results[0]["agnostic"]["per_class"]  # the agnostic block ran in both


def test_worker_pool_reports_a_missing_checkpoint_without_hanging(study, tmp_path: Path) -> None:
    root, params = study
    with pytest.raises(CcnfError, match="checkpoint not found"):
        evaluate_task(params, "t1", root / "features", tmp_path / "nowhere",
                      tmp_path / "m.json", tmp_path / "eval")
    assert not (tmp_path / "m.json").exists()


def test_an_error_in_a_worker_reaches_the_stage_intact(study, tmp_path: Path) -> None:
    root, params = study
    features = tmp_path / "features"
    shutil.copytree(root / "features", features)
    (features / "c" / "test.pt").unlink()  # a job of the second task fails in its worker
    raw = params.model_dump()
    raw["eval"]["workers"] = 2
    with pytest.raises(CcnfError) as err:
        evaluate_task(parse_params(raw), "t1", features, root / "models" / "t1",
                      tmp_path / "m.json", tmp_path / "eval")
    assert "c" in str(err.value) and err.value.fix
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "eval").exists()
