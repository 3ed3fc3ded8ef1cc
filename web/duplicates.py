"""GET /duplicates: the duplicate groups of the served index, as `fastret duplicates --json` gives them.

Each setting's report is computed once per served version (in the threadpool, one computation at
a time) and kept until `fastret serve` swaps in another version.
"""

from __future__ import annotations

import threading

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from fastret.service.duplicates import DuplicateReport, find_duplicates, parse_threshold
from fastret.service.live import LiveRetriever
from fastret.service.search import Retriever


class CopyOut(BaseModel):
    id: int  # item id: /items/{id}/thumbnail and /items/{id}/image show it
    path: str
    width: int
    height: int
    bytes: int
    mtime: float
    reason: str  # "kept", "identical bytes", "identical pixels" or "near-duplicate"
    cosine: float | None  # embeddings' cosine to the kept file
    agreement: float | None  # pixel agreement with the kept file once aligned (1 = the same pixels)
    mirrored: bool


class GroupOut(BaseModel):
    kept: CopyOut
    duplicates: list[CopyOut]


class SkippedOut(BaseModel):
    path: str
    reason: str


class DuplicatesOut(BaseModel):
    root: str
    items: int
    threshold: float
    threshold_setting: str
    mirrored: bool
    keep_rule: str
    groups: list[GroupOut]
    duplicates: int
    skipped: list[SkippedOut]
    seconds: dict[str, float]


def duplicates_router(retriever: Retriever | LiveRetriever) -> APIRouter:
    router = APIRouter()
    reports: dict[tuple[float, bool], DuplicateReport] = {}
    reported: list[Retriever] = []  # the served Retriever the reports are of
    computing = threading.Lock()

    def report_for(threshold: float, mirrored: bool) -> DuplicateReport:
        live = retriever.current()  # a LiveRetriever swaps in new versions
        with computing:
            if reported != [live]:
                reports.clear()
                reported[:] = [live]
            key = (threshold, mirrored)
            if key not in reports:
                reports[key] = find_duplicates(live, threshold=threshold, mirrored=mirrored)
            return reports[key]

    @router.get("/duplicates", response_model=DuplicatesOut,
                summary="Groups of duplicate images, the file to keep first (as `fastret duplicates --json`)")
    async def duplicates(
        threshold: str = Query("auto", max_length=32, description="'auto' or the least pixel agreement, in (0, 1]"),
        mirrored: bool = Query(True, description="count mirror images as duplicates"),
    ) -> DuplicatesOut:
        try:
            value = parse_threshold(threshold)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        report = await run_in_threadpool(report_for, value, mirrored)
        return DuplicatesOut(**report.to_dict(), threshold_setting=threshold)

    return router
