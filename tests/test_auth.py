"""The API key guard and CORS."""

from __future__ import annotations

from conftest import assert_envelope, serving
from test_images import encoded, picture

URL = "/v1/images/generations"
EDITS = "/v1/images/edits"
SMALL = {"size": "64x64", "num_inference_steps": 2}
KEY = "sk-test-0123456789"


def edit_form() -> list:
    return [
        ("prompt", (None, "a cat")),
        ("num_inference_steps", (None, "2")),
        ("image", ("image.png", encoded(picture()), "image/png")),
    ]


def test_api_key_guards_v1_routes_and_leaves_probes_and_metrics_open(settings, runner):
    with serving(settings, runner, api_key=KEY) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
            error = assert_envelope(client.get("/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key" and KEY not in str(error)
        # Refused before the body is read or validated.
        assert_envelope(client.post(URL, content=b"not json", headers={"content-type": "text/plain"}), 401)
        assert_envelope(client.post(EDITS, files=edit_form()), 401)
        authorised = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/v1/models", headers=authorised).status_code == 200
        assert client.post(URL, json={"prompt": "a", **SMALL}, headers=authorised).status_code == 200
        assert client.post(EDITS, files=edit_form(), headers=authorised).status_code == 200
        for open_path in ("/", "/health", "/ready", "/metrics", "/schema/openapi.json"):
            assert client.get(open_path).status_code == 200, open_path


def test_cors_is_off_by_default_and_allows_only_the_configured_origins(settings, runner):
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with serving(settings, runner) as client:
        response = client.options(URL, headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    with serving(settings, runner, cors_origins=("https://app.example",)) as client:
        response = client.options(URL, headers=preflight)
        assert response.status_code in (200, 204)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        simple = client.get("/health", headers={"Origin": "https://app.example"})
        assert simple.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
