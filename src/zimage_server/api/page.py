"""The browser page: `/` serves static/index.html, `/static/*` its CSS and JavaScript.

Shipped inside the package (no build step, no CDN), so it works offline. It talks to the same
`/v1/*` API as any client; it stays open when the API asks for a key, and asks the user for one.
"""

from __future__ import annotations

from pathlib import Path

from litestar import MediaType, get
from litestar.response import File
from litestar.static_files import create_static_files_router

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


@get("/", include_in_schema=False, cache=False)
async def index() -> File:
    return File(
        STATIC_DIR / "index.html", filename="index.html", media_type=MediaType.HTML, content_disposition_type="inline"
    )


PAGE_ROUTES = [index, create_static_files_router(path="/static", directories=[STATIC_DIR], name="static")]
