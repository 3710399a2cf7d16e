"""The ``ccnf`` command line: what users run outside DVC.

    ccnf params                 validate params.yaml
    ccnf data synth OUT_DIR     generate the embedded synthetic dataset
    ccnf data check             difficulty check: training-free 1-NN patch memory AUROC
    ccnf info                   the current run's results in the terminal
    ccnf score IMAGE --cls C    score one image with a trained checkpoint
    ccnf report readme|check    write / verify the README's result tables
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ccnf.config import load_params
from ccnf.console import console, report_user_errors
from ccnf.errors import CcnfError

app = typer.Typer(
    help="Continual Conditional Normalizing Flows: study tools.", no_args_is_help=True
)
data_app = typer.Typer(help="The dataset: generate, check difficulty.", no_args_is_help=True)
report_app = typer.Typer(help="Result tables in README.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(report_app, name="report")

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params file")


@app.command("params")
@report_user_errors
def params_cmd(params: Path = PARAMS) -> None:
    """Validate params.yaml and print the task split."""
    p = load_params(params)
    table = Table(title=f"{params}: valid ({p.data.source} data)")
    table.add_column("task")
    table.add_column("classes")
    table.add_column("starts from")
    for name, classes in zip(p.task_names, p.split, strict=True):
        table.add_row(name, ", ".join(classes), p.tasks[name].prev)
    console.print(table)


@data_app.command("synth")
@report_user_errors
def data_synth(out_dir: Path, params: Path = PARAMS) -> None:
    """Generate the synthetic MVTec-layout dataset into OUT_DIR (data.synthetic params)."""
    from ccnf.data.synthetic import generate

    summary = generate(out_dir, load_params(params).data.synthetic)
    console.print(f"wrote {out_dir}: {summary}")


@data_app.command("check")
@report_user_errors
def data_check(
    root: Path = typer.Option(None, help="MVTec-layout root (default: data.root)"),
    params: Path = PARAMS,
    out: Path = typer.Option(Path("metrics/data_check.json"), help="where to write the JSON"),
) -> None:
    """Training-free per-class 1-NN patch memory on the dataset: is it a fair test bed?"""
    from ccnf.atomic import write_json
    from ccnf.data.calibration import knn_check

    p = load_params(params)
    report = knn_check(
        root or Path(p.data.root),
        p.classes,
        image_size=p.data.image_size,
        mask_size=p.data.mask_size,
        backbone_cfg=p.backbone,
    )
    console.print(report.to_table())
    write_json(out, report.to_dict())
    console.print(f"written to {out}")


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


@app.command("info")
@report_user_errors
def info(metrics: Path = typer.Option(Path("metrics"), help="metrics directory")) -> None:
    """Print the current run's summary, R matrix and per-class table."""
    from ccnf.report import SUMMARY_COLUMNS, load_metrics
    from ccnf.scoring import SCORES

    summary, per_class = load_metrics(metrics)
    table = Table(title="final averages (after the last task) and forgetting")
    table.add_column("score")
    for _, label in SUMMARY_COLUMNS:
        table.add_column(label, justify="right")
    for s in SCORES:
        table.add_row(s, *(f"{summary[s][k]:.4f}" for k, _ in SUMMARY_COLUMNS))
    console.print(table)
    mats = json.loads((metrics / "matrices.json").read_text())
    r = mats["nf"]["image_auroc"]
    rt = Table(title="R[t][j], nf image AUROC (rows: after task t; cols: task j)")
    rt.add_column("after")
    for j in range(len(r)):
        rt.add_column(f"t{j}", justify="right")
    for t, row in enumerate(r):
        rt.add_row(f"t{t}", *(_fmt(v) for v in row))
    console.print(rt)
    ct = Table(title="per class, final model")
    for col in ("task", "class", "nf image", "nf pixel", "nf AUPRO", "proto image",
                "hybrid image"):
        ct.add_column(col, justify="right" if col not in ("class",) else "left")
    for cls, m in per_class.items():
        ct.add_row(
            f"t{m['task']}", cls, f"{m['nf']['image_auroc']:.3f}", f"{m['nf']['pixel_auroc']:.3f}",
            f"{m['nf']['aupro']:.3f}", f"{m['proto']['image_auroc']:.3f}",
            f"{m['hybrid']['image_auroc']:.3f}",
        )
    console.print(ct)


@app.command("score")
@report_user_errors
def score(
    image: Path,
    cls: str = typer.Option(..., "--cls", help="class of the image (oracle selection)"),
    model_dir: Path = typer.Option(None, "--model", help="checkpoint dir (default: last task)"),
    out: Path = typer.Option(None, help="write the nf anomaly map here (PNG)"),
    params: Path = PARAMS,
) -> None:
    """Score one image with a trained checkpoint: image scores and the anomaly map."""
    import numpy as np
    import torch

    from ccnf.backbone import Backbone
    from ccnf.data.images import load_image
    from ccnf.flows.ccnf import CCNF, read_checkpoint
    from ccnf.scoring import image_scores, pixel_maps, score_images

    p = load_params(params)
    model_dir = model_dir or Path("models") / p.task_names[-1]
    ckpt = read_checkpoint(model_dir)
    if cls not in ckpt["classes"]:
        raise CcnfError(
            f"class '{cls}' is not known to {model_dir}",
            fix=f"use one of: {', '.join(ckpt['classes'])}",
        )
    model = CCNF.from_checkpoint(ckpt, p.flow)
    pixels = load_image(image, p.data.image_size)
    feats = Backbone(p.backbone)(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    cid = torch.tensor([ckpt["classes"].index(cls)])
    raw = score_images(model, list(feats), cid, p.score, p.data.mask_size, 1)
    stats = ckpt["calibration"][cls]
    imgs = image_scores(raw, stats, p.score.alpha)
    table = Table(title=f"{image} as '{cls}'")
    table.add_column("score")
    table.add_column("image score", justify="right")
    table.add_column("calibrated (z)", justify="right")
    table.add_row("nf", f"{imgs['nf'][0]:.4f}",
                  f"{(imgs['nf'][0] - stats['nf_image'][0]) / stats['nf_image'][1]:+.2f}")
    table.add_row("proto", f"{imgs['proto'][0]:.4f}",
                  f"{(imgs['proto'][0] - stats['proto_image'][0]) / stats['proto_image'][1]:+.2f}")
    table.add_row("hybrid", f"{imgs['hybrid'][0]:.4f}", f"{imgs['hybrid'][0]:+.2f}")
    console.print(table)
    if out is not None:
        from ccnf.plots import GalleryRow, plot_gallery

        amap = pixel_maps(raw, stats, p.score.alpha)["nf"][0]
        row = GalleryRow(
            image=load_image(image, p.data.mask_size),
            mask=np.zeros(amap.shape, dtype=bool),
            anomaly_map=amap,
            caption=f"{image.name} as {cls}: nf {imgs['nf'][0]:.3f}",
        )
        plot_gallery([row], out, "ccnf score")
        console.print(f"anomaly map written to {out}")


@report_app.command("readme")
@report_user_errors
def report_readme(
    readme: Path = typer.Option(Path("README.md")),
    metrics: Path = typer.Option(Path("metrics")),
) -> None:
    """Rewrite README's results block from metrics/."""
    from ccnf.report import update_readme

    update_readme(readme, metrics)
    console.print(f"{readme}: results block updated from {metrics}")


@report_app.command("check")
@report_user_errors
def report_check(
    readme: Path = typer.Option(Path("README.md")),
    metrics: Path = typer.Option(Path("metrics")),
    tolerance: float = typer.Option(0.002, help="largest allowed absolute difference"),
) -> None:
    """Fail if README's results differ from metrics/ by more than the tolerance."""
    from ccnf.report import check_readme

    problems = check_readme(readme, metrics, tolerance)
    if problems:
        raise CcnfError(
            f"README results differ from fresh metrics (tolerance {tolerance}):\n  "
            + "\n  ".join(problems),
            fix="if the change is intended: ccnf report readme, then commit README.md",
        )
    console.print(f"README results match {metrics} within {tolerance}")


if __name__ == "__main__":
    app()
