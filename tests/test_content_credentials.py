"""Signed C2PA Content Credentials: a throw-away CA and signing certificate made here with
`cryptography`, outputs signed by the server, read back with c2pa's own Reader trusting that CA."""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import subprocess
import sys

import c2pa
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import serving
from test_edits import form
from test_images import encoded, picture
from zimage_server.content_credentials import ContentCredentials, CredentialsError, check_pair
from zimage_server.provenance import COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, TRAINED_ALGORITHMIC_MEDIA
from zimage_server.testing import certificate_name, key_pem, make_ca, make_leaf, pem, write_pair

URL = "/v1/images/generations"
BASE = {"prompt": "a secret red chair", "size": "64x64", "num_inference_steps": 2, "seed": 7}
NOW = datetime.datetime.now(datetime.timezone.utc)
IMAGE_DATA = {"png": b"IDAT", "jpeg": b"\xff\xda", "webp": b"VP8 "}  # where each format's pixels start
@pytest.fixture(scope="module")
def ca():
    return make_ca()


@pytest.fixture(scope="module")
def signing(ca, tmp_path_factory):
    key, leaf = make_leaf(ca)
    return write_pair(tmp_path_factory.mktemp("c2pa"), ca, key, leaf)


def read_manifest(blob: bytes, media_type: str, ca) -> dict:
    """The active manifest and the validation state, as c2pa reads them trusting the test CA."""
    settings = c2pa.Settings.from_dict({"verify": {"verify_trust": True}, "trust": {"trust_anchors": pem(ca[1]).decode()}})
    with c2pa.Reader(media_type, io.BytesIO(blob), context=c2pa.Context(settings)) as reader:
        report = json.loads(reader.json())
    manifest = report["manifests"][report["active_manifest"]]
    return {"state": report["validation_state"], "status": report.get("validation_status", []), "manifest": manifest}


def actions_of(manifest: dict) -> list[dict]:
    [actions] = [a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
    return actions


def action_of(manifest: dict) -> dict:
    """The action that made the image: the only one, or the one after an edit's `c2pa.opened`."""
    return actions_of(manifest)[-1]


def b64_image(response) -> bytes:
    assert response.status_code == 200, response.text[:300]
    return base64.b64decode(response.json()["data"][0]["b64_json"])


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_outputs_carry_a_manifest_that_validates_against_the_ca_and_breaks_when_changed(
    settings, runner, signing, ca, output_format
):
    cert, key = signing
    with serving(settings, runner, c2pa_cert=cert, c2pa_key=key) as client:
        blob = b64_image(client.post(URL, json=BASE | {"output_format": output_format}))
    media_type = f"image/{output_format}"
    read = read_manifest(blob, media_type, ca)
    assert read["state"] == "Trusted", read["status"]
    [action] = actions_of(read["manifest"])
    assert action["action"] == "c2pa.created" and action["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert action["softwareAgent"]["name"] == "zimage-server" and action["parameters"]["model"] == "z-image-turbo"
    assert "secret" not in json.dumps(read["manifest"])  # no prompt unless asked for
    # One byte of the image data (not of the manifest) changed: the hash no longer matches.
    tampered = bytearray(blob)
    tampered[blob.index(IMAGE_DATA[output_format]) + 12] ^= 0x01
    broken = read_manifest(bytes(tampered), media_type, ca)
    assert broken["state"] == "Invalid"


def test_edits_are_edited_with_the_upload_as_an_ingredient_and_prompts_only_on_request(settings, runner, signing, ca):
    cert, key = signing
    upload = encoded(picture(64, 64))
    with serving(settings, runner, c2pa_cert=cert, c2pa_key=key, c2pa_include_prompt=True) as client:
        edited = b64_image(client.post("/v1/images/edits", **form(upload, seed=3, prompt="a secret cat")))
        generated = b64_image(client.post(URL, json=BASE))
    read = read_manifest(edited, "image/png", ca)
    assert read["state"] == "Trusted", read["status"]
    opened, action = actions_of(read["manifest"])
    assert opened["action"] == "c2pa.opened" and action["action"] == "c2pa.edited"
    assert action["digitalSourceType"] == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    [ingredient] = read["manifest"]["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["format"] == "image/png"
    assert "thumbnail" not in ingredient  # its hash, not its pixels
    assert action["parameters"]["prompt"] == "a secret cat"
    assert action_of(read_manifest(generated, "image/png", ca)["manifest"])["parameters"]["prompt"] == BASE["prompt"]


def test_bad_certificates_and_keys_are_one_line_each(ca, tmp_path):
    key, leaf = make_leaf(ca)
    expired_key, expired = make_leaf(ca, valid_from=-60, valid_until=-1)
    future_key, future = make_leaf(ca, valid_from=5, valid_until=60)
    odd_key, odd_curve = make_leaf(ca, key=ec.generate_private_key(ec.SECP256K1()))
    other = ec.generate_private_key(ec.SECP256R1())
    cases = {
        "expired on": (pem(expired), key_pem(expired_key)),
        "not valid before": (pem(future), key_pem(future_key)),
        "does not match": (pem(leaf), key_pem(other)),
        "cannot sign C2PA manifests": (pem(odd_curve), key_pem(odd_key)),
        "not a PEM certificate chain": (b"hello", key_pem(key)),
        "not an unencrypted PEM private key": (pem(leaf), b"nope"),
    }
    for expected, (chain, private) in cases.items():
        with pytest.raises(CredentialsError, match=expected) as caught:
            check_pair(chain, private)
        assert "\n" not in str(caught.value)
    # The SEC1 form `openssl ecparam -genkey` writes is accepted (handed to c2pa as PKCS#8).
    sec1 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())  # fmt: skip
    assert sec1.startswith(b"-----BEGIN EC PRIVATE KEY")
    ContentCredentials(pem(leaf) + pem(ca[1]), sec1, None, False)
    # A pair that passes our checks but that c2pa refuses (no key identifiers) fails at start-up too.
    ca_key, ca_cert = ca
    plain = (
        x509.CertificateBuilder().subject_name(certificate_name("bare")).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=1)).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    with pytest.raises(CredentialsError, match="c2pa library cannot sign"):
        ContentCredentials(pem(plain) + pem(ca_cert), key_pem(key), None, False)


def test_serve_refuses_a_bad_pair_with_exit_code_2_before_loading(models_dir, ca, tmp_path):
    expired_key, expired = make_leaf(ca, valid_from=-60, valid_until=-1)
    cert, key = write_pair(tmp_path, ca, expired_key, expired)
    env = {k: v for k, v in os.environ.items() if not k.startswith("Z_IMAGE_")} | {
        "MODELS_DIR": str(models_dir),
        "Z_IMAGE_DEVICE": "cpu",
        "Z_IMAGE_C2PA_CERT": str(cert),
        "Z_IMAGE_C2PA_KEY": str(key),
    }
    result = subprocess.run(
        [sys.executable, "-m", "zimage_server.cli", "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "expired on" in lines[0] and "Traceback" not in result.stderr
    only_cert = env | {"Z_IMAGE_C2PA_KEY": ""}
    result = subprocess.run(
        [sys.executable, "-m", "zimage_server.cli", "serve"], env=only_cert, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Z_IMAGE_C2PA_KEY is not set" in result.stderr


def test_inspect_prints_every_mark_and_validates_against_given_anchors(settings, runner, signing, ca, tmp_path, capsys):
    from zimage_server.cli import main

    cert, key = signing
    with serving(settings, runner, c2pa_cert=cert, c2pa_key=key) as client:
        signed = b64_image(client.post(URL, json=BASE | {"output_format": "jpeg"}))
    with serving(settings, runner) as client:
        unsigned = b64_image(client.post(URL, json=BASE))
    (tmp_path / "signed.jpg").write_bytes(signed)
    (tmp_path / "unsigned.png").write_bytes(unsigned)
    (tmp_path / "ca.pem").write_bytes(pem(ca[1]))
    tampered = bytearray(signed)
    tampered[signed.index(IMAGE_DATA["jpeg"]) + 12] ^= 0x01
    (tmp_path / "tampered.jpg").write_bytes(bytes(tampered))

    def inspect(name: str, *extra: str) -> dict:
        main(["inspect", str(tmp_path / name), "--json", *extra])
        return json.loads(capsys.readouterr().out)

    trusted = inspect("signed.jpg", "--trust-anchors", str(tmp_path / "ca.pem"))
    assert trusted["xmp"]["DigitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert trusted["c2pa"]["validation_state"] == "Trusted" and trusted["c2pa"]["actions"] == ["c2pa.created"]
    assert inspect("signed.jpg")["c2pa"]["failures"] == ["signingCredential.untrusted"]  # valid, signer unknown
    assert inspect("tampered.jpg")["c2pa"]["validation_state"] == "Invalid"
    plain = inspect("unsigned.png")
    assert plain["c2pa"] is None and plain["xmp"]["AISystemUsed"] == "z-image-turbo"
    main(["inspect", str(tmp_path / "signed.jpg")])  # the human form: one line per kind of mark
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("XMP: DigitalSourceType") and lines[2].startswith("C2PA: Valid")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit) as exited:
        main(["inspect", str(tmp_path / "notes.txt")])
    assert exited.value.code == 2 and "not an image" in capsys.readouterr().err
