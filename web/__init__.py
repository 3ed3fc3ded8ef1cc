"""The web app and HTTP API: search an index from a browser or with `curl`.

`create_app(retriever)` builds the FastAPI app; `fastret serve` runs it under uvicorn.
Needs the `web` extra (`pip install 'fastret[web]'`).
"""

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Largest query upload the API accepts by default (`fastret serve --max-upload-mb`)."""

DEFAULT_MAX_DECODES = 4
"""Uploads decoded at once by `fastret serve` (`--max-decodes`); the others wait their turn."""
