"""Stage extract: run the frozen backbone once per image; cache features per class and split."""

from __future__ import annotations

from pathlib import Path

from _common import parser

from ccnf.config import load_params
from ccnf.console import console, report_user_errors
from ccnf.data.manifest import Manifest
from ccnf.device import device_name, resolve_device
from ccnf.features import extract_features


@report_user_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--manifest", default="data/manifest.json")
    p.add_argument("--out", default="features")
    args = p.parse_args()
    params = load_params(args.params)
    device = resolve_device(params.device)
    stats = extract_features(
        Manifest.load(Path(args.manifest)), params, Path(args.out), console=console, device=device
    )
    console.print(
        f"extracted {stats['images']:.0f} images on {device_name(device)} in "
        f"{stats['seconds']:.1f} s (+{stats['build_seconds']:.1f} s building the backbone): "
        f"{stats['stage_images_per_s']:.1f} images/s through the stage, "
        f"{stats['forward_images_per_s']:.1f} images/s backbone forward alone"
    )


if __name__ == "__main__":
    main()
