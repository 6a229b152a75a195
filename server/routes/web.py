"""The browser front end: GET / serves the chat page, /web/<file> its script and style (no build step).

The page talks to the same JSON API as any client, with the tenant key the user types in.
"""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from core.errors import NotFound

router = APIRouter(include_in_schema=False)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Only these files are served: no path from the URL ever reaches the file system.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "evidence.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Everything the page loads comes from this server; originals open as blob: URLs in a new tab.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/")
def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/web/{name}")
def asset(name: str) -> FileResponse:
    """Raises: NotFound for any name that is not one of the page's assets."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no web asset {name!r}")
    return FileResponse(WEB_DIR / name, media_type=media_type, headers=PAGE_HEADERS)
