"""The FastAPI app: a search page plus a JSON API over one loaded index and its encoder.

Requests run concurrently: uploads are decoded in the threadpool, encoded by a MicroBatcher
(one encoder call for the queries that arrive together), then searched in the threadpool.
"""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from fastret import __version__
from fastret.engine.decode import DEFAULT_MAX_PIXELS, ImageError, load_pixels
from fastret.engine.encoders import Encoder
from fastret.engine.index import FORMAT_VERSION, Index
from fastret.engine.retrieval import SCORES, rank_hits
from fastret.web import DEFAULT_MAX_UPLOAD_BYTES
from fastret.web.batcher import DEFAULT_MAX_BATCH, MicroBatcher
from fastret.web.items import ItemNotFound, item_file, parse_item_id, thumbnail_jpeg

STATIC = Path(__file__).parent / "static"
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_K = 1000
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
    path: str  # relative to the index root
    label: str
    score: float


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
    score: ScoreName
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
    index: Index,
    encoder: Encoder,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> FastAPI:
    """The app for one index; the encoder must be the one the index was built with."""
    index.check_model(encoder.info)
    batcher = MicroBatcher(encoder, max_batch)

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

    async def ranked(query: np.ndarray, name: str, k: int, exact: bool, score: str, exclude: frozenset[int],
                     stamps: list[float], batch_size: int) -> SearchOut:
        """Rank in the threadpool; stamps are perf_counter() at start, decoded and encoded."""
        hits = await run_in_threadpool(rank_hits, index, query, k, exact=exact, score=score, exclude=exclude)
        started, decoded, encoded, finished = *stamps, time.perf_counter()
        return SearchOut(
            query=name,
            model=index.model.model_id,
            backend=encoder.backend,
            k=k,
            exact=exact,
            score=score,
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
            return load_pixels(io.BytesIO(data), index.model.preprocessing, max_pixels=max_pixels)
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

    K = Query(10, ge=1, le=MAX_K, description="number of results")
    EXACT = Query(False, description="brute-force search instead of HNSW")
    SCORE = Query("cosine", description="cosine similarity, or softmax probability over the database")

    @app.post("/search", response_model=SearchOut, summary="Search with an uploaded image (multipart field `image`)")
    async def search_upload(
        image: UploadFile = File(..., description="query image (JPEG, PNG, WebP, ...)"),
        k: int = K,
        exact: bool = EXACT,
        score: ScoreName = SCORE,
    ) -> SearchOut:
        stamps = [time.perf_counter()]
        data = await image.read(max_upload_bytes + 1)
        name = image.filename or "upload"
        pixels = await run_in_threadpool(decode_upload, data, name)
        stamps.append(time.perf_counter())
        encoded = await asyncio.wrap_future(batcher.submit(pixels))
        stamps.append(time.perf_counter())
        return await ranked(encoded.embedding, f"upload:{name}", k, exact, score, frozenset(), stamps, encoded.batch_size)

    @app.post(
        "/search/item/{item_id}",
        response_model=SearchOut,
        summary="Search with an indexed item (its stored embedding); the item itself is left out",
    )
    async def search_item(
        item_id: str,
        k: int = K,
        exact: bool = EXACT,
        score: ScoreName = SCORE,
    ) -> SearchOut:
        started = time.perf_counter()
        found = find_item(item_id)
        query = index.embeddings[found]
        return await ranked(query, f"item:{found}", k, exact, score, frozenset({found}), [started] * 3, 0)

    @app.get("/items/{item_id}/thumbnail", summary="JPEG thumbnail (at most 256 px) of an indexed item",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, 404: {}})
    async def thumbnail(item_id: str) -> Response:
        jpeg = await run_in_threadpool(cached_thumbnail, find_item(item_id))
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    @app.get("/items/{item_id}/image", summary="The original file of an indexed item",
             response_class=FileResponse, responses={404: {}})
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

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
