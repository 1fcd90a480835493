"""The page at / and its assets, served from the package without a browser (see test_browser.py for one)."""

from __future__ import annotations

import re
from pathlib import Path

import zimage_server

STATIC = Path(zimage_server.__file__).parent / "static"


def test_index_is_served_at_the_root_with_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>Z-Image</title>" in page.text
    # Relative links, so the page also works behind a proxy that mounts the server under a prefix.
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert sorted(assets) == ["static/app.css", "static/app.js"]
    for asset in assets:
        response = client.get("/" + asset)
        assert response.status_code == 200 and response.content == (STATIC / Path(asset).name).read_bytes()
    assert "/" not in client.get("/schema/openapi.json").json()["paths"]


def test_the_page_loads_nothing_from_elsewhere():
    # No CDN, no web fonts: the page must work offline, next to a server with no internet access.
    for path in STATIC.iterdir():
        assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", path.read_text()), path.name


def test_missing_static_files_are_404_in_the_error_envelope(client):
    response = client.get("/static/nothing.js")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
