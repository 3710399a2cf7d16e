"""The README's sample grid: normal and defective images per class, masks outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ccnf.atomic import atomic_path
from ccnf.data.synthetic.classes import CLASS_INFO, SYNTHETIC_CLASSES
from ccnf.errors import CcnfError

# sample grid for the README


def render_sample_grid(root: Path, out_png: Path) -> Path:
    """A PNG grid: per class, two normal training images and three defective test images
    (different defect kinds where possible) with the mask outline drawn in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    classes = [c for c in SYNTHETIC_CLASSES if (root / c).is_dir()]
    if not classes:
        raise CcnfError(f"no synthetic classes under {root}", fix="run the prepare stage first")
    fig, axes = plt.subplots(len(classes), 5, figsize=(5 * 1.7, len(classes) * 1.8), dpi=72)
    axes = np.atleast_2d(axes)
    for row, cls in enumerate(classes):
        info = CLASS_INFO[cls]
        train = sorted((root / cls / "train" / "good").glob("*.png"))[:2]
        kinds = [d.name for d in sorted((root / cls / "test").iterdir()) if d.name != "good"]
        kinds = sorted(kinds, key=lambda d: info.defects.index(d) if d in info.defects else 99)
        picks: list[tuple[Path, Path | None, str]] = [(p, None, "normal") for p in train]
        for j in range(3):
            if not kinds:
                break
            kind = kinds[j % len(kinds)]
            images = sorted((root / cls / "test" / kind).glob("*.png"))
            image = images[(j // len(kinds)) % len(images)]
            mask = root / cls / "ground_truth" / kind / f"{image.stem}_mask.png"
            picks.append((image, mask, kind))
        for col in range(5):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(picks):
                ax.axis("off")
                continue
            image, mask, label = picks[col]
            arr = np.asarray(Image.open(image))
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=255)
            if mask is not None and mask.is_file():
                ax.contour(
                    np.asarray(Image.open(mask)) > 127, levels=[0.5], colors="red", linewidths=0.8
                )
            ax.set_title(label, fontsize=7, pad=2)
            if col == 0:
                ax.set_ylabel(f"{cls}\n{info.kind}, {info.colour}", fontsize=8)
    fig.tight_layout(pad=0.3)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return out_png
