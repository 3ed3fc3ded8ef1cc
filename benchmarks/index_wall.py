"""Whole-process wall time of indexing a folder: `fastret index` against the PyTorch baseline.

Both run as fresh processes (imports, model load, decode, encode, writing the index), in turn,
A B A B..., on the same images; the table gives each one's median wall time and peak memory and
the ratio. The baseline's "index" is what a careful student keeps: the stacked embeddings, saved
with numpy (see baseline.py for its pipeline).

    python benchmarks/index_wall.py --images ../shared/data/wang1k --limit 500 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import OUT, limited_view, machine, table, timed_process, write_json  # noqa: E402


def baseline_child(images: Path, model: str, out: Path) -> None:
    """What the baseline process does: embed every image, save the (N, D) matrix."""
    from baseline import Baseline

    from fastret.engine.decode import list_images

    embeddings = Baseline(model).embed_files(list_images(images))
    np.save(out, embeddings.numpy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="folder of images (sub-folders kept)")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--model", default="efficientnet-lite2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT / "index_wall.json")
    parser.add_argument("--baseline-child", nargs=2, metavar=("IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_child:
        baseline_child(Path(args.baseline_child[0]), args.model, Path(args.baseline_child[1]))
        return 0
    if args.images is None:
        parser.error("--images is required")

    scratch = Path(tempfile.mkdtemp(prefix="fastret-index-wall-"))
    view = limited_view(args.images, args.limit, scratch / "images")
    fastret_bin = str(Path(sys.executable).with_name("fastret"))
    commands = {
        "fastret index": [fastret_bin, "index", str(view), "--model", args.model, "--out", str(scratch / "index"), "-q"],
        "baseline (torch eager)": [
            sys.executable, str(HERE / "index_wall.py"), "--model", args.model,
            "--baseline-child", str(view), str(scratch / "baseline.npy"),
        ],
    }
    first_run, _ = timed_process(commands["fastret index"])  # makes missing artefacts: export, INT8 model
    print(f"first `fastret index` (makes any missing one-off artefact: export, INT8 calibration): {first_run:.1f} s")
    walls: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, command in commands.items():
            wall, peak = timed_process(command)
            walls[name].append(wall)
            peaks.setdefault(name, peak)
    medians = {name: float(np.median(values)) for name, values in walls.items()}
    ratio = medians["baseline (torch eager)"] / medians["fastret index"]
    rows = [[name, medians[name], min(walls[name]), max(walls[name]), peaks[name]] for name in commands]
    print(f"whole-process indexing of {args.limit} images from {args.images} ({args.model}), {args.repeats} runs each, interleaved")
    print(table(["command", "median s", "min s", "max s", "peak RSS MiB"], rows))
    print(f"baseline / fastret (median wall): {ratio:.2f}x")
    write_json(args.out, {"machine": machine(), "images": args.limit, "model": args.model, "walls": walls,
                          "first_run_s": round(first_run, 2),
                          "medians": medians, "peak_rss_mib": peaks, "ratio_baseline_over_fastret": round(ratio, 2)})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
