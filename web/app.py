"""The FastAPI app: a search page plus a JSON API over the search service (one index and its encoder).

Requests run concurrently: uploads are decoded in the threadpool (at most `max_decodes` at once),
encoded by a MicroBatcher (one encoder call for the queries that arrive together), then searched
in the threadpool by the Retriever, which gives every option the meaning it has in the CLI. Each
request takes the service's `current()` Retriever once (a LiveRetriever swaps in new versions of
the index), so it is answered by one version from start to end.
"""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import asynccontextmanager
from functools import lru_cache, partial
from pathlib import Path
from typing import BinaryIO, Callable, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from fastret import __version__
from fastret.engine.decode import DEFAULT_SERVER_MAX_PIXELS, ImageError
from fastret.engine.index import FORMAT_VERSION
from fastret.engine.retrieval import SCORES, Hit, display_path
from fastret.service.live import LiveRetriever
from fastret.service.load import BackendUnavailable
from fastret.service.search import MAX_K, Retriever, SearchOptions, combine_views, query_views, rerank_request
from fastret.service.stores import store_name, version_name
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
    400: {
        "model": Problem,
        "description": "the request is well formed but cannot be used: a body that is no multipart form, an "
        "upload that is no decodable image or has more pixels than the server's cap (`--max-pixels`), or "
        "options that do not combine (softmax with re-ranking)",
    },
    404: {"model": Problem, "description": "no such item"},
    413: {"model": Problem, "description": "the request body exceeds the upload limit (`--max-upload-mb`)"},
}
"""Statuses with a one-line `detail`; 422 (a parameter out of its schema) is FastAPI's list of errors."""


def problems(*statuses: int) -> dict:
    """The OpenAPI responses of an endpoint: these statuses, plus 413 (every request body is capped)."""
    return {status: ERRORS[status] for status in sorted({*statuses, 413})}


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
    search: str  # "hnsw" or "exact": how the ranking (re-ranked or plain) was searched
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
    index_version: str | None = None  # the version served (it changes when the index is updated)
    store: str = "hnswlib"  # where the items live: "hnswlib" (the index folder) or "lancedb" (a LanceDB table)
    text_queries: bool = False  # POST /search/text works (a CLIP model with its text tower)
    text_unavailable: str | None = None  # why it does not, in one line
    rerank: dict | None = None  # what the default search's re-ranking runs (steps, source, ef, notes)


class TextQueryIn(BaseModel):
    text: str  # what to find, e.g. "a red bus at night"; at most 1000 characters
    negative: str | None = None  # words to subtract from the query, e.g. "people" (as `fastret search --not`)


class TextSearchOut(SearchOut):
    text: str
    negative: str | None
    notes: list[str]  # e.g. the words past the model's context length, which it did not read


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
    retriever: Retriever | LiveRetriever,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_SERVER_MAX_PIXELS,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_decodes: int = DEFAULT_MAX_DECODES,
) -> FastAPI:
    """The app over one search service, which must hold an encoder (uploads are embedded); each
    request is answered by the service's `current()` Retriever, taken once (a LiveRetriever swaps in
    new versions of the index)."""
    encoder = retriever.current().encoder
    if encoder is None:
        raise ValueError("the web app embeds uploads: open the search service with its encoder")
    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels), ("max_decodes", max_decodes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
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

    @app.exception_handler(RequestValidationError)
    async def validation_errors(_: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 less each error's `input` and `ctx`: never echo what was sent (an upload
        sent as a text field would come back whole)."""
        errors = [{key: error[key] for key in ("loc", "msg", "type")} for error in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    async def ranked(live: Retriever, search: Callable[[], list[Hit]], name: str, options: SearchOptions,
                     stamps: list[float], batch_size: int) -> SearchOut:
        """Run the search in the threadpool; stamps are perf_counter() at start, decoded and encoded."""
        hits, described = await run_in_threadpool(lambda: (search(), live.describe(options)))
        started, decoded, encoded, finished = *stamps, time.perf_counter()
        return SearchOut(
            query=name,
            model=live.index.model.model_id,
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

    def decode_upload(live: Retriever, upload: BinaryIO, filename: str) -> np.ndarray:
        """Decode straight from the spooled upload: only the decoder's memory, not a copy of the body."""
        size = upload.seek(0, io.SEEK_END)
        upload.seek(0)
        if size == 0:
            raise HTTPException(400, f"{filename}: empty upload (0 bytes)")
        if size > max_upload_bytes:
            raise HTTPException(413, f"{filename}: {size:,} bytes exceeds the {max_upload_bytes:,}-byte limit")
        try:
            return live.decode(upload, max_pixels=max_pixels)
        except ImageError as exc:
            raise HTTPException(400, f"{filename}: {exc}") from None
        except Exception as exc:  # a hostile file must not reach a 500: Pillow plugins raise odd types
            raise HTTPException(400, f"{filename}: cannot decode: {type(exc).__name__}: {exc}") from None

    def find_item(live: Retriever, raw_id: str) -> int:
        try:
            return parse_item_id(live.index, raw_id)
        except ItemNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    def served_file(live: Retriever, item_id: int) -> Path:
        try:
            return item_file(live.index, item_id)
        except ItemNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @lru_cache(maxsize=THUMBNAIL_CACHE_ITEMS)
    def cached_thumbnail(path: Path, mtime_ns: int, size: int) -> bytes:
        """Keyed by the file as it is now: an edited file gets a new thumbnail."""
        return thumbnail_jpeg(path)

    def thumbnail_of(live: Retriever, item_id: int) -> bytes:
        path = served_file(live, item_id)
        try:
            info = path.stat()
            return cached_thumbnail(path, info.st_mtime_ns, info.st_size)
        except ImageError as exc:
            raise HTTPException(404, f"item {item_id}: {exc}") from None
        except OSError as exc:
            raise HTTPException(404, f"item {item_id}: {exc.strerror}") from None

    def search_options(
        k: int = Query(10, ge=1, le=MAX_K, description="number of results"),
        exact: bool = Query(False, description="brute-force search instead of HNSW"),
        ef: int | None = Query(None, ge=1, le=100_000, description="HNSW ef at query time (default: the index's)"),
        score: ScoreName = Query("cosine", description="cosine similarity, or softmax probability over the database"),
        rerank: bool = Query(True, description="the recommended re-ranking (PCA + DBA + alpha-QE), on by default; "
                             "false: the plain ranking, as `--no-rerank`"),
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

    @app.post("/search", response_model=SearchOut, responses=problems(400),
              summary="Search with an uploaded image (multipart field `image`)")
    async def search_upload(
        image: UploadFile = File(..., description="query image (JPEG, PNG, WebP, GIF, TIFF, BMP)"),
        options: SearchOptions = Depends(search_options),
    ) -> SearchOut:
        stamps = [time.perf_counter()]
        live = retriever.current()
        name = display_path(image.filename or "upload")
        async with decode_slots:
            pixels = await run_in_threadpool(decode_upload, live, image.file, name)
        stamps.append(time.perf_counter())
        views = [await asyncio.wrap_future(batcher.submit(view[0])) for view in query_views(pixels[None], options.flip_tta)]
        embedding = combine_views([view.embedding[None] for view in views])[0]
        stamps.append(time.perf_counter())
        search = partial(live.search_vector, embedding, options)
        return await ranked(live, search, f"upload:{name}", options, stamps, views[0].batch_size)

    @app.post(
        "/search/item/{item_id}",
        response_model=SearchOut,
        responses=problems(400, 404),
        summary="Search with an indexed item (its stored embedding); the item itself is left out unless include_self",
    )
    async def search_item(item_id: str, options: SearchOptions = Depends(search_options)) -> SearchOut:
        started = time.perf_counter()
        live = retriever.current()
        found = find_item(live, item_id)
        return await ranked(live, partial(live.search_item, found, options), f"item:{found}", options, [started] * 3, 0)

    @app.post("/search/text", response_model=TextSearchOut, responses=ERRORS,
              summary="Search with words (CLIP models): JSON body {text, negative}; options as query parameters")
    async def search_text(query: TextQueryIn, options: SearchOptions = Depends(search_options)) -> TextSearchOut:
        started = time.perf_counter()
        live = retriever.current()
        try:
            made = await run_in_threadpool(live.text_query, query.text, options, negative=query.negative)
        except (ValueError, BackendUnavailable) as exc:  # empty / too long text, or no text tower
            raise HTTPException(400, str(exc)) from None
        encoded = time.perf_counter()
        search = partial(live.search_vector, made.vector, options, made.exclude)
        texts = 1 + (query.negative is not None)  # embedded together, in one call of the text tower
        out = (await ranked(live, search, made.description, options, [started, started, encoded], texts)).model_dump()
        out["backend"] = live.text_encoder().backend
        return TextSearchOut(**out, text=query.text, negative=query.negative, notes=list(made.notes))

    @app.get("/items/{item_id}/thumbnail", summary="JPEG thumbnail (at most 256 px) of an indexed item",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, **problems(404)})
    async def thumbnail(item_id: str) -> Response:
        live = retriever.current()
        jpeg = await run_in_threadpool(thumbnail_of, live, find_item(live, item_id))
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    @app.get("/items/{item_id}/image", summary="The original file of an indexed item",
             response_class=FileResponse, responses={200: {"content": {"image/*": {}}}, **problems(404)})
    async def original(item_id: str) -> FileResponse:
        live = retriever.current()
        path = served_file(live, find_item(live, item_id))
        return FileResponse(path, headers={"Cache-Control": "private, max-age=60"})

    @app.get("/health", response_model=HealthOut, responses=problems(), summary="Model, item count and index format")
    async def health() -> HealthOut:
        live = retriever.current()
        index = live.index
        text_unavailable = await run_in_threadpool(live.text_unavailable)
        default = await run_in_threadpool(live.describe, SearchOptions())
        return HealthOut(
            status="ok",
            version=__version__,
            model=index.model.model_id,
            dim=index.model.dim,
            backend=encoder.backend,
            count=len(index),
            index_format_version=FORMAT_VERSION,
            index_version=version_name(index),
            store=store_name(index),
            text_queries=text_unavailable is None,
            text_unavailable=text_unavailable,
            rerank=default["rerank"],
        )

    app.include_router(duplicates_router(retriever))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
