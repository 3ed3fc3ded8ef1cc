"""Cold `fastret search`: whole-process wall time of one query on a 1,000- and a 10,000-image index,
with and without the compiled query model that `fastret index` saves (without: the search compiles
the model in memory, as before), in turn A B A B so that a change of machine load hits both alike;
then where one process spends its time (a child timing its own phases: imports, openvino, opening
the index, opening the encoder, the query).

Indexes are built here with a private model cache (--cache), so moving its compiled query models
aside for the "without" runs touches nothing of the user's. The searches run with Python's bytecode
cache on (PYTHONDONTWRITEBYTECODE removed from their environment, one untimed search first), as
after any `pip install`: without it every search compiles fastret's modules again.

    python benchmarks/cold_search.py --small ../shared/data/wang1k --large /tmp/scaled/db --repeats 11
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import OUT, machine, table, timed_process, write_json  # noqa: E402

PHASES = """
import sys, time
started = time.perf_counter()
from fastret.cli.main import main
imported = time.perf_counter()
from fastret.engine.openvino_runtime import import_openvino
import_openvino()
openvino = time.perf_counter()
from fastret.engine.index import Index
from fastret.service.load import encoder_for_index
from fastret.service.search import Retriever, SearchOptions
index = Index.load(sys.argv[2], graph=False)  # what `fastret search` reads for a re-ranked query
loaded = time.perf_counter()
encoder = encoder_for_index(index)
opened = time.perf_counter()
Retriever(index, encoder).search_file(sys.argv[1], SearchOptions())
done = time.perf_counter()
print(json.dumps({"imports": imported - started, "openvino import": openvino - imported,
                  "index open": loaded - openvino, "encoder open": opened - loaded, "query": done - opened,
                  "query model imported": encoder.imported_query_model}))
""".replace("import sys, time", "import json, sys, time")


def query_models_dir(index_dir: Path) -> Path:
    """The compiled query models folder of the export the index's artefact lies in."""
    from fastret.engine.index import Index
    from fastret.engine.openvino_runtime import QUERY_MODELS_DIR
    from fastret.export.onnx_export import export_dir_name

    index = Index.load(index_dir)
    artefact = Path(index.encoder["artefact"])
    name = export_dir_name(index.model.model_id, index.model.weights_sha256)
    return Path(*artefact.parts[: artefact.parts.index(name) + 1]) / QUERY_MODELS_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=Path, required=True, help="a folder of about 1,000 images")
    parser.add_argument("--large", type=Path, required=True, help="a folder of about 10,000 images")
    parser.add_argument("--model", default="efficientnet-lite2")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--cache", type=Path, default=None, help="private model cache (default: a new temp dir)")
    parser.add_argument("--out", type=Path, default=OUT / "cold_search.json")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="fastret-cold-"))
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    env = {**os.environ, "FASTRET_CACHE": str(args.cache or scratch / "cache")}
    fastret_bin = str(Path(sys.executable).with_name("fastret"))
    indexes = {}
    for name, folder in (("1k", args.small), ("10k", args.large)):
        indexes[name] = scratch / f"index-{name}"
        subprocess.run([fastret_bin, "index", str(folder), "--model", args.model, "--out", str(indexes[name]), "-q"],
                       env=env, check=True, stderr=subprocess.DEVNULL)
    query = str(next(p for p in sorted(args.small.rglob("*")) if p.is_file()))
    saved = query_models_dir(indexes["1k"])
    aside = saved.with_name(saved.name + ".aside")
    os.environ["FASTRET_CACHE"] = env["FASTRET_CACHE"]
    for index_dir in indexes.values():  # writes the bytecode cache, reads the files into the page cache
        subprocess.run([fastret_bin, "search", query, "--index", str(index_dir)], check=True, capture_output=True)
    walls: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, index_dir in indexes.items():
            for variant in ("with", "without"):
                if variant == "without":
                    saved.rename(aside)
                try:
                    wall, _ = timed_process([fastret_bin, "search", query, "--index", str(index_dir)])
                finally:
                    if variant == "without":
                        aside.rename(saved)
                walls.setdefault(f"{name} {variant}", []).append(wall)
    phases = {}
    for name, index_dir in indexes.items():
        runs = [json.loads(subprocess.run([sys.executable, "-c", PHASES, query, str(index_dir)], env=env, check=True,
                                          capture_output=True, text=True).stdout) for _ in range(5)]
        phases[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    medians = {key: statistics.median(values) for key, values in walls.items()}
    rows = [[f"{name} items", medians[f"{name} with"], medians[f"{name} without"],
             medians[f"{name} without"] / medians[f"{name} with"]] for name in indexes]
    print(f"cold `fastret search`, median of {args.repeats} whole-process runs each, in turn ({args.model})")
    print(table(["index", "with query model s", "compiling s", "ratio"], rows))
    keys = [key for key in next(iter(phases.values())) if key != "query model imported"]
    print(table(["index"] + [f"{key} s" for key in keys], [[name] + [phases[name][key] for key in keys] for name in phases]))
    write_json(args.out, {"machine": machine(), "model": args.model, "walls": walls, "medians": medians,
                          "phases": phases})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
