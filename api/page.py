"""The web page at `GET /`, the service's console in a browser: ask a question about an image or caption it and
watch the job end; start a batch (image URLs, or files uploaded from the browser) or open one, and watch its
progress, failed items and end estimate; see each task's workers and answers per second. Jobs and batches are followed
by long polls (`?wait=`), which the API answers the moment they change.

One HTML file, its scripts (one per view or panel, and page.js, which sets the page up) and one style sheet from
api/static/page/, served as they are (no build step). They hold
no secret and are public; the API calls the page makes (the /v1 routes, /v1/models for the workers) carry the key
that the user typed in it, which the browser keeps in its localStorage.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

from api.auth import public

PAGE_DIR = Path(__file__).resolve().parent / "static" / "page"
# The page runs only its own script and talks only to this API (an API key sits in its storage): nothing inline,
# nothing from elsewhere. An uploaded image is previewed from a blob: URL; a batch's results, read with the key, are
# saved from one (a download is no fetch: connect-src need not allow blob:).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

bp = Blueprint("page", __name__)


@bp.get("/")
@public
def index() -> Response:
    """The page."""
    return _send("index.html")


@bp.get("/page/<path:filename>")
@public
def asset(filename: str) -> Response:
    """The page's script and style sheet."""
    return _send(filename)


def _send(filename: str) -> Response:
    response = send_from_directory(PAGE_DIR, filename)  # a name outside PAGE_DIR, or no such file: 404
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
