"""Provenance marks: every output carries IPTC's digital source type in XMP (PNG iTXt, JPEG APP1, WebP
`XMP ` chunk), read back with Pillow's own XMP reader; edits are composites; previews carry none."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from conftest import serving
from test_edits import form
from test_images import encoded, picture
from test_streaming import of_type, parse_events
from zimage_server.provenance import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    CREATOR_TOOL,
    TRAINED_ALGORITHMIC_MEDIA,
)

URL = "/v1/images/generations"
BASE = {"prompt": "a red chair", "size": "64x64", "num_inference_steps": 2, "seed": 7}
# Where each container keeps XMP: PNG's iTXt keyword, JPEG's APP1 namespace, WebP's extended-format chunks.
CONTAINER_MARKS = {
    "png": [b"iTXtXML:com.adobe.xmp\x00"],
    "jpeg": [b"\xff\xe1", b"http://ns.adobe.com/xap/1.0/\x00"],
    "webp": [b"VP8X", b"XMP "],
}


def xmp_of(blob: bytes) -> dict:
    description = Image.open(io.BytesIO(blob)).getxmp()["xmpmeta"]["RDF"]["Description"]
    return {key: description[key] for key in ("DigitalSourceType", "AISystemUsed", "CreatorTool")}


def first_image(response) -> bytes:
    assert response.status_code == 200, response.text[:300]
    return base64.b64decode(response.json()["data"][0]["b64_json"])


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_every_format_carries_the_source_type_creator_tool_and_model(client, output_format):
    blob = first_image(client.post(URL, json=BASE | {"output_format": output_format}))
    assert all(mark in blob for mark in CONTAINER_MARKS[output_format])
    assert xmp_of(blob) == {
        "DigitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "AISystemUsed": "z-image-turbo",
        "CreatorTool": CREATOR_TOOL,
    }
    if output_format == "png":  # A1111's parameters chunk stays as it was
        assert Image.open(io.BytesIO(blob)).text["parameters"].startswith("a red chair\n")


def test_edits_are_marked_as_composites_and_a1111_images_are_marked(client):
    edited = first_image(client.post("/v1/images/edits", **form(encoded(picture(64, 64)), seed=3)))
    assert xmp_of(edited)["DigitalSourceType"] == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    txt2img = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 2})
    assert txt2img.status_code == 200
    assert xmp_of(base64.b64decode(txt2img.json()["images"][0]))["DigitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA


def test_stream_previews_carry_no_marks_and_completed_images_do(client):
    response = client.post(URL, json=BASE | {"stream": True, "partial_images": 1, "num_inference_steps": 3})
    events = parse_events(response.text)
    [partial] = of_type(events, "image_generation.partial_image")
    [completed] = of_type(events, "image_generation.completed")
    assert b"XML:com.adobe.xmp" not in base64.b64decode(partial["b64_json"])
    assert xmp_of(base64.b64decode(completed["b64_json"]))["DigitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA


def test_provenance_off_writes_no_marks_and_changes_nothing_else(settings, runner, client):
    marked = first_image(client.post(URL, json=BASE))
    with serving(settings, runner, provenance="off") as plain_client:
        plain = first_image(plain_client.post(URL, json=BASE))
        jpeg = first_image(plain_client.post(URL, json=BASE | {"output_format": "jpeg"}))
    assert b"XML:com.adobe.xmp" not in plain and b"http://ns.adobe.com/xap/1.0/" not in jpeg
    assert Image.open(io.BytesIO(plain)).tobytes() == Image.open(io.BytesIO(marked)).tobytes()
    assert Image.open(io.BytesIO(plain)).text["parameters"] == Image.open(io.BytesIO(marked)).text["parameters"]
