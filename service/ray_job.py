"""Embedding a gallery on a Ray cluster (`fastret index DIR --engine ray`; extra `fastret[ray]`).

The driver lists the files exactly as the local job does (`list_images`: same allowlist, same
skip reasons), opens the encoder once (so any export or INT8 calibration happens there, once) and
ships its recipe with the artefact's bytes. Ray Data spreads the paths over an actor pool; each
actor opens the recipe's artefact (at its recorded path where the cluster shares that disk, else
from the shipped bytes; it never exports or calibrates) and runs the local pipeline
(`embed_files`) on its share, so decoding, skipping and encoding are the local job's. The result
is the local job's `EmbedResult`, in listing order, so `build_index` takes either.

Ray is imported only here, and only when the Ray engine is asked for.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fastret.engine.decode import DEFAULT_MAX_PIXELS, Skipped
from fastret.engine.encoders import Encoder, EncoderRecipe, artefact_files, artefact_size
from fastret.engine.files import sha256_files
from fastret.engine.pipeline import DEFAULT_BATCH_SIZE, EmbedResult, embed_files
from fastret.service.load import BackendUnavailable, encoder_from_recipe

PATHS_PER_TASK = 64
"""Paths per Ray Data batch: enough to amortise Ray's per-batch cost, small enough for steady progress."""


def ray_missing() -> str | None:
    """Why the Ray engine cannot run here (None: it can)."""
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:
        return f"--engine ray needs the extra: pip install 'fastret[ray]' ({exc})"
    return None


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray job runs."""

    address: str | None = None  # None: join the cluster of this process, else start a local one
    actors: int | None = None  # encoder actors (None: one per CPU of the cluster, over cpus_per_actor)
    cpus_per_actor: int = 1  # also the encoder's threads in each actor
    paths_per_task: int = PATHS_PER_TASK

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"Ray actors must be at least 1, got {self.actors}")
        if self.cpus_per_actor < 1 or self.paths_per_task < 1:
            raise ValueError("cpus_per_actor and paths_per_task must be at least 1")


def ray_embedder(options: RayOptions = RayOptions(), *, log: Callable[[str], None] = lambda _: None):
    """A function with embed_files' signature that embeds on Ray (what build_index's `embed` takes)."""
    missing = ray_missing()
    if missing:
        raise BackendUnavailable(missing)

    def embed(paths: Sequence[Path], encoder: Encoder, **kwargs) -> EmbedResult:
        return embed_files_ray(paths, encoder.recipe, options, log=log, **kwargs)

    return embed


def embed_files_ray(
    paths: Sequence[Path],
    recipe: EncoderRecipe,
    options: RayOptions = RayOptions(),
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 1,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_skip: Callable[[Skipped], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    thumbnails: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> EmbedResult:
    """embed_files on a Ray actor pool: the same kept paths, order and skip reasons.

    `thumbnails` is accepted and not kept: the Ray job returns embeddings only, and the duplicate
    finder decodes the images an index kept no thumbnail of.

    `batch_size` and `workers` are each actor's encoder batch and decoder threads. Stage times:
    `ray_start` (joining or starting the cluster), `ship_artefact` (putting the artefact into the
    object store), `encode` (the distributed run, actors' start-up included) and `total`.
    """
    import ray

    if recipe.artefact is None:
        raise BackendUnavailable(
            f"--engine ray ships an exported artefact to its workers; {recipe.backend} has none: choose "
            "--backend onnxruntime or openvino"
        )
    started = time.perf_counter()
    ours = not ray.is_initialized()
    if ours:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        joined = time.perf_counter()
        shipped = {part.name: ray.put(part.read_bytes()) for part in artefact_files(Path(recipe.artefact))}
        put = time.perf_counter()
        actors = options.actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // options.cpus_per_actor)
        log(f"ray: {actors} encoder actors x {options.cpus_per_actor} CPU on {ray.cluster_resources().get('CPU', 0):g} "
            f"CPUs ({'a local cluster' if options.address is None and ours else options.address or 'this cluster'})")
        actor_options = {
            "recipe": recipe.to_dict(),
            "shipped": {"refs": shipped},  # wrapped: actors fetch the bytes only when they need them
            "threads": options.cpus_per_actor,
            "pipeline": {"batch_size": batch_size, "workers": workers, "draft": draft, "max_pixels": max_pixels},
        }
        result = _run(paths, recipe, actor_options, actors, options, on_skip, on_progress)
    finally:
        if ours:
            ray.shutdown()
    finished = time.perf_counter()
    result.stage_seconds = {
        "ray_start": round(joined - started, 4),
        "ship_artefact": round(put - joined, 4),
        "encode": round(finished - put, 4),
        "total": round(finished - started, 4),
    }
    return result


def _run(
    paths: Sequence[Path],
    recipe: EncoderRecipe,
    actor_options: dict,
    actors: int,
    options: RayOptions,
    on_skip: Callable[[Skipped], None] | None,
    on_progress: Callable[[int], None] | None,
) -> EmbedResult:
    """The Ray Data pipeline, its batches collected as they come (progress, skips) and put back in order."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plan and timing lines are not the user's
    ray.data.DataContext.get_current().enable_progress_bars = False  # progress is the caller's (on_progress)
    rows = [{"order": i, "path": str(p)} for i, p in enumerate(paths)]
    with warnings.catch_warnings():  # max_restarts goes through ray_remote_args, which Ray deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = ray.data.from_items(rows).map_batches(
            EncoderActor,
            fn_constructor_kwargs=actor_options,
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=options.paths_per_task,
            num_cpus=options.cpus_per_actor,
            max_restarts=0,  # a lost actor fails the job rather than restarting from evicted arguments
        )
    dim = recipe.model.dim
    orders, vectors, reasons = [np.empty(0, np.int64)], [np.empty((0, dim), np.float32)], {}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        orders.append(batch["order"])
        vectors.append(batch["embedding"].reshape(-1, dim))
        for row, reason in zip(batch["order"], batch["reason"]):
            if reason:
                reasons[int(row)] = skip = Skipped(Path(paths[int(row)]), str(reason))
                if on_skip is not None:
                    on_skip(skip)
        if on_progress is not None:
            on_progress(len(batch["order"]))
    order = np.concatenate(orders)
    sort = np.argsort(order, kind="stable")
    order, embeddings = order[sort], np.concatenate(vectors)[sort]
    kept = np.array([int(i) not in reasons for i in order], dtype=bool)
    return EmbedResult(
        paths=[Path(paths[int(i)]) for i in order[kept]],
        embeddings=np.ascontiguousarray(embeddings[kept], dtype=np.float32),
        skipped=[reasons[i] for i in sorted(reasons)],
    )


class EncoderActor:
    """One encoder per Ray actor, opened from the driver's recipe; embeds a batch of paths with the
    local pipeline. Rows that did not embed carry their skip reason and a zero vector."""

    def __init__(self, recipe: dict, shipped: dict, threads: int, pipeline: dict) -> None:
        recipe_ = local_recipe(EncoderRecipe.from_dict(recipe), shipped["refs"])
        self.encoder = encoder_from_recipe(recipe_, threads=threads, workload="throughput")
        self.pipeline = pipeline  # embed_files' options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [Path(p) for p in batch["path"]]
        result = embed_files(paths, self.encoder, **self.pipeline)
        vectors = dict(zip(result.paths, result.embeddings))
        reasons = {skip.path: skip.reason for skip in result.skipped}
        zero = np.zeros(self.encoder.info.dim, np.float32)
        return {
            "order": batch["order"],
            "embedding": np.stack([vectors.get(p, zero) for p in paths]),
            "reason": np.array([reasons.get(p, "") if p not in vectors else "" for p in paths], dtype=object),
        }


def local_recipe(recipe: EncoderRecipe, shipped: dict) -> EncoderRecipe:
    """The recipe with an artefact this machine has: the recorded file where the cluster shares it
    (same size), else the driver's shipped bytes written to a local folder and checked."""
    recorded = Path(recipe.artefact)
    if all(part.is_file() for part in artefact_files(recorded)) and recipe.artefact_bytes in (None, artefact_size(recorded)):
        return recipe
    import ray

    folder = Path(tempfile.mkdtemp(prefix="fastret-artefact-"))
    for name, ref in shipped.items():
        (folder / name).write_bytes(ray.get(ref))
    local = folder / recorded.name
    if recipe.artefact_sha256 is not None:
        if sha256_files(artefact_files(local)) != recipe.artefact_sha256:
            raise BackendUnavailable(f"the shipped artefact {recorded.name} does not match the recipe's sha256")
    return replace(recipe, artefact=str(local))
