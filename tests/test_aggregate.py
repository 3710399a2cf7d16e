"""aggregate: summary.json layout (task-aware, task-agnostic, class selection), matrices, the
README results block built from them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_evaluate import build_study, with_select

from ccnf.aggregate import aggregate, selection_matrices, summarize_selection
from ccnf.evaluate import evaluate_task
from ccnf.names import ALL_METRICS, SCORES
from ccnf.records import TaskResult
from ccnf.report import check_readme, load_metrics, results_block, update_readme

SUMMARY_KEYS = set(ALL_METRICS) | {
    f"{m}_{kind}" for m in ("image", "pixel", "aupro")
    for kind in ("forgetting", "diagonal", "step_average", "bwt")
}
WORST = {"image_auroc_worst_class", "pixel_auroc_worst_class",
         "image_auroc_over_classes", "pixel_auroc_over_classes"}


def _fake(t: int, agnostic: dict) -> TaskResult:
    return TaskResult(task=f"t{t}", task_index=t, class_select="likelihood", thresholds={},
                      per_class={}, per_task={}, agnostic=agnostic)


def _fake_results(
    acc: list[list[float]], by_method: dict[str, list[list[float]]]
) -> list[TaskResult]:
    """Task results holding only the selection accuracies of R (T, T)."""
    out = []
    for t, row in enumerate(acc):
        per_task = {
            f"t{j}": {
                "selection_accuracy": row[j],
                "selection_accuracy_by_method": {m: r[t][j] for m, r in by_method.items()},
            }
            for j in range(t + 1)
        }
        out.append(_fake(t, {"same_as_aware": False, "per_task": per_task}))
    return out


def test_selection_accuracy_final_average_and_forgetting() -> None:
    acc = [[1.0], [0.8, 0.9], [0.5, 0.6, 0.7]]
    other = [[0.9], [0.7, 0.8], [0.6, 0.4, 0.9]]
    tasks = ["t0", "t1", "t2"]
    sel = selection_matrices(
        _fake_results(acc, {"likelihood": acc, "prototype": other}), tasks
    )
    assert np.isnan(sel["accuracy"][0, 1])
    np.testing.assert_array_equal(sel["prototype"][2], [0.6, 0.4, 0.9])
    got = summarize_selection("likelihood", sel)
    assert got["method"] == "likelihood"
    assert got["accuracy"] == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    # forgetting: task 0 best before the end 1.0 -> 0.5, task 1 best 0.9 -> 0.6
    assert got["forgetting"] == pytest.approx(((1.0 - 0.5) + (0.9 - 0.6)) / 2)
    assert got["prototype_accuracy"] == pytest.approx((0.6 + 0.4 + 0.9) / 3)
    assert got["likelihood_accuracy"] == got["accuracy"]
    oracle = [_fake(t, {"same_as_aware": True}) for t in range(len(tasks))]
    sel = selection_matrices(oracle, tasks)
    assert set(sel) == {"accuracy"} and sel["accuracy"][2, 0] == 1.0
    assert summarize_selection("oracle", sel) == {
        "method": "oracle", "accuracy": 1.0, "forgetting": 0.0
    }


def _study(root: Path, method: str, every_task: bool = True) -> Path:
    params = with_select(
        build_study(root, {"eval": {"gallery_per_class": 0, "agnostic_every_task": every_task}}),
        method,
    )
    for task in params.task_names:
        evaluate_task(params, task, root / "features", root / "models" / task,
                      root / "metrics/tasks" / f"{task}.json", root / "eval" / task)
        (root / "models" / task / "train_log.tsv").write_text(
            "step\ttask\tepoch\tloss\tL_g\n0\t0\t0\t1.5\t1.2\n1\t0\t0\t1.25\t1.0\n"
        )
    aggregate(params, root / "metrics", root / "models", root / "eval", root / "plots")
    return root


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _study(tmp_path_factory.mktemp("aggregate"), "likelihood")


def test_summary_has_aware_agnostic_and_selection_blocks(aggregated: Path) -> None:
    summary = json.loads((aggregated / "metrics/summary.json").read_text())
    assert set(summary) == {*SCORES, "agnostic", "class_select", "memory"}
    for score in SCORES:
        assert set(summary[score]) == SUMMARY_KEYS | WORST
        assert set(summary["agnostic"][score]) == SUMMARY_KEYS
    sel = summary["class_select"]
    assert set(sel) == {
        "method", "accuracy", "forgetting", "likelihood_accuracy", "prototype_accuracy"
    }
    assert sel["method"] == "likelihood" and sel["accuracy"] == sel["likelihood_accuracy"]
    last = json.loads((aggregated / "metrics/tasks/t1.json").read_text())
    # final average = mean over tasks of the last evaluation's per-task values
    for score in SCORES:
        for metric in ALL_METRICS:
            want = np.mean([last["agnostic"]["per_task"][t][score][metric] for t in ("t0", "t1")])
            assert summary["agnostic"][score][metric] == pytest.approx(want, abs=1e-6)
    want = np.mean([last["agnostic"]["per_task"][t]["selection_accuracy"] for t in ("t0", "t1")])
    assert sel["accuracy"] == pytest.approx(want, abs=1e-6)
    # every value rounded to 6 decimals
    flat = [v for s in SCORES for blk in (summary[s], summary["agnostic"][s]) for v in blk.values()]
    assert all(round(v, 6) == v for v in flat)
    mats = json.loads((aggregated / "metrics/matrices.json").read_text())
    assert mats["class_select"]["accuracy"][0][1] is None
    assert set(mats["agnostic"]["nf"]) == set(ALL_METRICS)
    per_class = json.loads((aggregated / "metrics/per_class.json").read_text())
    assert set(per_class) == {"a", "b", "c", "d"}
    assert "selection_accuracy" in per_class["a"]["agnostic"]
    assert (aggregated / "plots/R_class_select.png").stat().st_size > 1000
    assert (aggregated / "plots/R_agnostic_image_auroc.png").stat().st_size > 1000


def test_memory_is_what_the_final_model_keeps(aggregated: Path) -> None:
    """summary.memory: bytes of every tensor of the final model, and what later tasks added."""
    from ccnf.models import read_checkpoint

    mem = json.loads((aggregated / "metrics/summary.json").read_text())["memory"]
    ckpt = read_checkpoint(aggregated / "models/t1")
    weights = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    assert mem["bytes"] == weights and mem["stored_images"] == 0
    first = read_checkpoint(aggregated / "models/t0")["state_dict"]
    grown = weights - sum(v.numel() * v.element_size() for v in first.values())
    assert mem["first_task_bytes"] == weights - grown
    assert mem["added_bytes_per_task"] == grown > 0  # two new classes' rows
    assert mem["added_bytes_per_class"] == grown / 2


def test_memory_summary_arithmetic() -> None:
    from conftest import tiny_params

    from ccnf.aggregate import summarize_memory
    from ccnf.config import parse_params

    params = parse_params(tiny_params(Path("/nonexistent"), [["a"], ["b", "c"], ["d"]]))
    results = [_fake(t, {}) for t in range(3)]
    for r, (b, n) in zip(results, [(100, 0), (160, 3), (190, 5)], strict=True):
        r.footprint = {"values": b // 4, "bytes": b, "stored_images": n}
    mem = summarize_memory(results, params)
    assert mem == {"bytes": 190, "values": 47, "first_task_bytes": 100,
                   "added_bytes_per_task": 45.0, "added_bytes_per_class": 30.0,
                   "added_values_per_task": 11.0, "stored_images": 5}
    results[1].footprint = {}
    assert summarize_memory(results, params) == {}


def test_agnostic_after_the_last_task_only(tmp_path: Path) -> None:
    """Default eval.agnostic_every_task: false: final averages, no agnostic forgetting."""
    root = _study(tmp_path, "likelihood", every_task=False)
    first = json.loads((root / "metrics/tasks/t0.json").read_text())
    assert first["agnostic"] == {"class_select": "likelihood", "same_as_aware": False,
                                 "skipped": True}
    summary = json.loads((root / "metrics/summary.json").read_text())
    last = json.loads((root / "metrics/tasks/t1.json").read_text())
    want = np.mean([last["agnostic"]["per_task"][t]["nf"]["image_auroc"] for t in ("t0", "t1")])
    assert summary["agnostic"]["nf"]["image_auroc"] == pytest.approx(want, abs=1e-6)
    assert "image_forgetting" not in summary["agnostic"]["nf"]
    assert "image_forgetting" in summary["nf"]
    assert "forgetting" not in summary["class_select"]


def test_readme_block_round_trip_and_check(aggregated: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:begin -->\nold\n<!-- results:end -->\ntail\n")
    update_readme(readme, aggregated / "metrics")
    text = readme.read_text()
    assert "Task-agnostic" in text and "| likelihood (used) |" in text
    assert "F1 @ mean+k*std" in text and text.endswith("tail\n")
    assert check_readme(readme, aggregated / "metrics", 1e-4) == []
    # "| nf |" rows: aware, continual figures, agnostic, thresholds aware and agnostic
    lines = text.splitlines()
    rows = [i for i, ln in enumerate(lines) if ln.startswith("| nf |")]
    assert len(rows) == 5
    summary, _ = load_metrics(aggregated / "metrics")
    nf = summary["nf"]
    assert lines[rows[1]].startswith(
        f"| nf | {nf['image_auroc']:.4f} | {nf['image_auroc_over_classes']:.4f} | "
        f"{nf['image_step_average']:.4f} | "
        f"{nf['image_diagonal']:.4f} | {nf['image_bwt']:.4f} |")
    value = f"{summary['agnostic']['nf']['image_auroc']:.4f}"
    assert lines[rows[2]].startswith(f"| nf | {value} |")
    lines[rows[2]] = lines[rows[2]].replace(f"| nf | {value} |", "| nf | 0.1234 |")
    readme.write_text("\n".join(lines) + "\n")
    problems = check_readme(readme, aggregated / "metrics", 1e-4)
    assert len(problems) == 1 and "0.1234" in problems[0]


def test_oracle_study_reports_the_aware_block_as_agnostic(tmp_path: Path) -> None:
    root = _study(tmp_path, "oracle")
    summary = json.loads((root / "metrics/summary.json").read_text())
    # the worst-class entries are task-aware only
    assert summary["agnostic"] == {
        s: {k: v for k, v in summary[s].items() if k not in WORST} for s in SCORES
    }
    assert summary["class_select"] == {"method": "oracle", "accuracy": 1.0, "forgetting": 0.0}
    per_class = json.loads((root / "metrics/per_class.json").read_text())
    assert per_class["c"]["agnostic"]["nf"] == per_class["c"]["nf"]
    results_block(*load_metrics(root / "metrics"))  # renders without selection pass data


def test_old_summary_without_agnostic_block_asks_for_repro(aggregated: Path, tmp_path) -> None:
    from ccnf.errors import CcnfError

    summary: dict[str, Any] = json.loads((aggregated / "metrics/summary.json").read_text())
    old = copy.deepcopy({s: summary[s] for s in SCORES})
    (tmp_path / "summary.json").write_text(json.dumps(old))
    (tmp_path / "per_class.json").write_text((aggregated / "metrics/per_class.json").read_text())
    with pytest.raises(CcnfError, match="dvc repro"):
        load_metrics(tmp_path)


def test_a_model_without_training_steps_aggregates(tmp_path: Path) -> None:
    """model.kind=gaussian writes header-only training logs: no loss plot, no failure."""
    root = tmp_path
    params = with_select(
        build_study(root, {"eval": {"gallery_per_class": 0, "agnostic_every_task": False}}),
        "likelihood",
    )
    for task in params.task_names:
        evaluate_task(params, task, root / "features", root / "models" / task,
                      root / "metrics/tasks" / f"{task}.json", root / "eval" / task)
        (root / "models" / task / "train_log.tsv").write_text("step\ttask\tepoch\tloss\n")
    summary = aggregate(params, root / "metrics", root / "models", root / "eval", root / "plots")
    assert "nf" in summary and not (root / "plots/loss_curves.png").exists()


def test_diagonal_worst_class_and_stale_calibration(aggregated: Path) -> None:
    """image_diagonal = mean of R[j][j]; *_worst_class = the lowest final per-class value;
    per_class.json names the scores whose threshold flags most normal test images."""
    summary = json.loads((aggregated / "metrics/summary.json").read_text())
    mats = json.loads((aggregated / "metrics/matrices.json").read_text())
    per_class = json.loads((aggregated / "metrics/per_class.json").read_text())
    for score in SCORES:
        r = mats[score]["image_auroc"]
        assert summary[score]["image_diagonal"] == pytest.approx(
            np.mean([r[j][j] for j in range(len(r))]), abs=1e-6)
        # A-AUROC and backward transfer straight from the R matrix the aggregate wrote
        t_ = len(r)
        assert summary[score]["image_step_average"] == pytest.approx(
            np.mean([np.mean(r[t][: t + 1]) for t in range(t_)]), abs=1e-6)
        assert summary[score]["image_bwt"] == pytest.approx(
            np.mean([r[t_ - 1][j] - r[j][j] for j in range(t_ - 1)]), abs=1e-6)
        assert summary[score]["pixel_auroc_worst_class"] == pytest.approx(
            min(m[score]["pixel_auroc"] for m in per_class.values()), abs=1e-6)
        for metric in ("image_auroc", "pixel_auroc"):
            assert summary[score][f"{metric}_over_classes"] == pytest.approx(
                np.mean([m[score][metric] for m in per_class.values()]), abs=1e-6)
    for m in per_class.values():
        want = [s for s in SCORES if m[s]["image_normal_flagged_kstd"] > 0.5]
        assert m["stale_calibration"] == want


def test_class_mean_differs_from_the_task_mean_only_with_unequal_tasks() -> None:
    """A hand-made 2-1 split: tasks [a, b] and [c]. The final average weighs each task once
    ((mean(a, b) + c) / 2); over_classes weighs each class once ((a + b + c) / 3)."""
    from ccnf.aggregate import final_class_figures

    per_class = {c: {"task": j, "nf": {"image_auroc": v, "pixel_auroc": v / 2}}
                 for c, j, v in (("a", 0, 0.6), ("b", 0, 0.8), ("c", 1, 1.0))}
    last = TaskResult(task="t1", task_index=1, class_select="oracle", thresholds={},
                      per_class=per_class, per_task={}, agnostic={})
    got = final_class_figures(last)["nf"]
    assert got["image_auroc_over_classes"] == pytest.approx(0.8)
    assert got["pixel_auroc_over_classes"] == pytest.approx(0.4)
    task_mean = (np.mean([0.6, 0.8]) + 1.0) / 2
    assert task_mean == pytest.approx(0.85)  # what summary's image_auroc would say


def test_ccnf_info_prints_chance_levels_for_ccnf_and_a_bank(aggregated: Path, tmp_path) -> None:
    """ccnf info reads whatever scores the metrics hold: all four for CCNF, nf and latent for a
    per-class bank (no proto score: it once crashed on that)."""
    from typer.testing import CliRunner

    from ccnf.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["info", "--metrics", str(aggregated / "metrics"), "--params",
                              str(tmp_path / "none.yaml")])
    assert res.exit_code == 0, res.output
    assert "chance levels" in res.output and "hybrid" in res.output
    bank = tmp_path / "metrics"
    bank.mkdir()
    keep = ("nf", "latent")
    for name in ("summary.json", "per_class.json", "matrices.json"):
        data = json.loads((aggregated / "metrics" / name).read_text())
        if name == "per_class.json":
            data = {c: {k: v for k, v in m.items() if k not in ("proto", "hybrid")}
                    for c, m in data.items()}
        else:
            data = {k: v for k, v in data.items() if k not in ("proto", "hybrid")}
        (bank / name).write_text(json.dumps(data))
    res = runner.invoke(app, ["info", "--metrics", str(bank), "--params",
                              str(tmp_path / "none.yaml")])
    assert res.exit_code == 0, res.output
    assert all(s in res.output for s in keep) and "hybrid" not in res.output
