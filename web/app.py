"""The FastAPI app: a search page plus a JSON API over the search service (one index and its encoder).

Requests run concurrently: uploads are decoded in the threadpool (at most `max_decodes` at once),
encoded by a MicroBatcher (one encoder call for the queries that arrive together), then searched
in the threadpool by the Retriever, which gives every option the meaning it has in the CLI.
"""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import asynccontextmanager
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from fastret import __version__
from fastret.engine.decode import DEFAULT_SERVER_MAX_PIXELS, ImageError
from fastret.engine.index import FORMAT_VERSION
from fastret.engine.retrieval import SCORES, Hit, display_path
from fastret.service.search import MAX_K, Retriever, SearchOptions, combine_views, query_views, rerank_request
from fastret.web import DEFAULT_MAX_DECODES, DEFAULT_MAX_UPLOAD_BYTES
from fastret.web.batcher import DEFAULT_MAX_BATCH, MicroBatcher
from fastret.web.duplicates import duplicates_router
from fastret.web.items import ItemNotFound, item_file, parse_item_id, thumbnail_jpeg

STATIC = Path(__file__).parent / "static"
MULTIPART_OVERHEAD_BYTES = 64 * 1024
ScoreName = Literal[SCORES]  # type: ignore[valid-type]  # "cosine" | "softmax"
THUMBNAIL_CACHE_ITEMS = 4096
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
}


class HitOut(BaseModel):
    rank: int
    id: int
    path: str  # relative to the index root; undecodable bytes and control characters escaped (\\xNN, \\n)
    path_bytes_b64: str | None  # the file name's raw bytes (base64) when `path` had to be escaped
    label: str
    score: float


class Problem(BaseModel):
    detail: str  # one line saying what was wrong


ERRORS = {
    400: {"model": Problem, "description": "the query or an option cannot be used"},
    404: {"model": Problem, "description": "no such item"},
    413: {"model": Problem, "description": "the upload is too large"},
}


class Timing(BaseModel):
    decode_ms: float
    encode_ms: float  # includes the wait for a shared encoder call
    search_ms: float
    total_ms: float
    batch_size: int  # queries encoded in the same encoder call (0: no encoding needed)


class SearchOut(BaseModel):
    query: str  # "upload:<file name>" or "item:<id>"
    model: str
    backend: str
    k: int
    exact: bool
    ef: int | None
    score: ScoreName
    rerank: dict | None  # the re-ranking steps that ran (None: plain ranking)
    flip_tta: bool
    include_self: bool
    search: str  # "hnsw", "exact" or "exact + re-ranking"
    results: list[HitOut]
    timing: Timing


class HealthOut(BaseModel):
    status: Literal["ok"]
    version: str
    model: str
    dim: int
    backend: str
    count: int
    index_format_version: int


class BodyTooLarge:
    """ASGI middleware: refuse request bodies over a cap (413) before they are buffered."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._reason())
            return message

        await self.app(scope, counting_receive, send)

    def _reason(self) -> str:
        return f"request body exceeds the {self.max_bytes:,}-byte limit"

    async def _refuse(self, scope, receive, send) -> None:
        response = JSONResponse({"detail": self._reason()}, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def create_app(
    retriever: Retriever,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_SERVER_MAX_PIXELS,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_decodes: int = DEFAULT_MAX_DECODES,
) -> FastAPI:
    """The app over one search service, which must hold an encoder (uploads are embedded)."""
    if retriever.encoder is None:
        raise ValueError("the web app embeds uploads: open the search service with its encoder")
    if max_decodes < 1:
        raise ValueError(f"max_decodes must be >= 1, got {max_decodes}")
    index, encoder = retriever.index, retriever.encoder
    batcher = MicroBatcher(encoder, max_batch)
    decode_slots = asyncio.Semaphore(max_decodes)  # bounds the memory of uploads decoded at once

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(
        title="fastret",
        version=__version__,
        summary="Image-to-image retrieval: upload a photo, get the most similar indexed images.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN: the schema is at /openapi.json
        redoc_url=None,
    )
    app.add_middleware(BodyTooLarge, max_bytes=max_upload_bytes + MULTIPART_OVERHEAD_BYTES)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def ranked(search: Callable[[], list[Hit]], name: str, options: SearchOptions, stamps: list[float],
                     batch_size: int) -> SearchOut:
        """Run the search in the threadpool; stamps are perf_counter() at start, decoded and encoded."""
        hits = await run_in_threadpool(search)
        started, decoded, encoded, finished = *stamps, time.perf_counter()
        described = options.to_dict()
        return SearchOut(
            query=name,
            model=index.model.model_id,
            backend=encoder.backend,
            **{key: described[key] for key in ("k", "exact", "ef", "score", "rerank", "flip_tta", "include_self", "search")},
            results=[HitOut(**hit.to_dict()) for hit in hits],
            timing=Timing(
                decode_ms=round(1000 * (decoded - started), 2),
                encode_ms=round(1000 * (encoded - decoded), 2),
                search_ms=round(1000 * (finished - encoded), 2),
                total_ms=round(1000 * (finished - started), 2),
                batch_size=batch_size,
            ),
        )

    def decode_upload(data: bytes, filename: str) -> np.ndarray:
        if not data:
            raise HTTPException(400, f"{filename}: empty upload (0 bytes)")
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{filename}: {len(data):,} bytes exceeds the {max_upload_bytes:,}-byte limit")
        try:
            return retriever.decode(io.BytesIO(data), max_pixels=max_pixels)
        except ImageError as exc:
            raise HTTPException(400, f"{filename}: {exc}") from None
        except Exception as exc:  # a hostile file must not reach a 500: Pillow plugins raise odd types
            raise HTTPException(400, f"{filename}: cannot decode: {type(exc).__name__}: {exc}") from None

    def find_item(raw_id: str) -> int:
        try:
            return parse_item_id(index, raw_id)
        except ItemNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @lru_cache(maxsize=THUMBNAIL_CACHE_ITEMS)
    def cached_thumbnail(item_id: int) -> bytes:
        try:
            return thumbnail_jpeg(item_file(index, item_id))
        except (ItemNotFound, ImageError) as exc:
            raise HTTPException(404, f"item {item_id}: {exc}") from None

    def search_options(
        k: int = Query(10, ge=1, le=MAX_K, description="number of results"),
        exact: bool = Query(False, description="brute-force search instead of HNSW"),
        ef: int | None = Query(None, ge=1, le=100_000, description="HNSW ef at query time (default: the index's)"),
        score: ScoreName = Query("cosine", description="cosine similarity, or softmax probability over the database"),
        rerank: bool = Query(False, description="the recommended re-ranking (PCA + DBA + alpha-QE), as `--rerank`"),
        pca: int | None = Query(None, ge=1, le=100_000, description="PCA to this many dimensions"),
        pca_power: float | None = Query(None, ge=0, le=1, description="0 plain PCA, 0.5 full whitening"),
        dba: int | None = Query(None, ge=0, le=1000, description="database-side augmentation with N neighbours"),
        qe: int | None = Query(None, ge=0, le=1000, description="alpha query expansion with the top N results"),
        alpha: float | None = Query(None, ge=0, le=100, description="DBA / QE neighbour weight exponent"),
        kreciprocal: bool = Query(False, description="k-reciprocal re-ranking of the top 100"),
        flip_tta: bool = Query(False, description="average the query's embedding with its mirror image's"),
        include_self: bool = Query(False, description="item queries: keep the item itself in the results"),
    ) -> SearchOptions:
        """The same options as `fastret search`, refused with 400 where they do not combine."""
        try:
            return SearchOptions(
                k=k, exact=exact, ef=ef, score=score, flip_tta=flip_tta, include_self=include_self,
                rerank=rerank_request(rerank, pca_dim=pca, pca_power=pca_power, dba_n=dba, qe_n=qe, alpha=alpha,
                                      kreciprocal=kreciprocal or None),
            )
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.post("/search", response_model=SearchOut, responses=ERRORS,
              summary="Search with an uploaded image (multipart field `image`)")
    async def search_upload(
        image: UploadFile = File(..., description="query image (JPEG, PNG, WebP, GIF, TIFF, BMP)"),
        options: SearchOptions = Depends(search_options),
    ) -> SearchOut:
        stamps = [time.perf_counter()]
        data = await image.read(max_upload_bytes + 1)
        name = display_path(image.filename or "upload")
        async with decode_slots:
            pixels = await run_in_threadpool(decode_upload, data, name)
        stamps.append(time.perf_counter())
        views = [await asyncio.wrap_future(batcher.submit(view[0])) for view in query_views(pixels[None], options.flip_tta)]
        embedding = combine_views([view.embedding[None] for view in views])[0]
        stamps.append(time.perf_counter())
        search = partial(retriever.search_vector, embedding, options)
        return await ranked(search, f"upload:{name}", options, stamps, views[0].batch_size)

    @app.post(
        "/search/item/{item_id}",
        response_model=SearchOut,
        responses=ERRORS,
        summary="Search with an indexed item (its stored embedding); the item itself is left out unless include_self",
    )
    async def search_item(item_id: str, options: SearchOptions = Depends(search_options)) -> SearchOut:
        started = time.perf_counter()
        found = find_item(item_id)
        return await ranked(partial(retriever.search_item, found, options), f"item:{found}", options, [started] * 3, 0)

    @app.get("/items/{item_id}/thumbnail", summary="JPEG thumbnail (at most 256 px) of an indexed item",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, 404: ERRORS[404]})
    async def thumbnail(item_id: str) -> Response:
        jpeg = await run_in_threadpool(cached_thumbnail, find_item(item_id))
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    @app.get("/items/{item_id}/image", summary="The original file of an indexed item",
             response_class=FileResponse, responses={404: ERRORS[404]})
    async def original(item_id: str) -> FileResponse:
        found = find_item(item_id)
        try:
            path = item_file(index, found)
        except ItemNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return FileResponse(path, headers={"Cache-Control": "private, max-age=60"})

    @app.get("/health", response_model=HealthOut, summary="Model, item count and index format")
    async def health() -> HealthOut:
        return HealthOut(
            status="ok",
            version=__version__,
            model=index.model.model_id,
            dim=index.model.dim,
            backend=encoder.backend,
            count=len(index),
            index_format_version=FORMAT_VERSION,
        )

    app.include_router(duplicates_router(retriever))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
