"""Signed C2PA Content Credentials in every output, when a certificate and key are configured.

Z_IMAGE_C2PA_CERT (a PEM chain, signing certificate first) and Z_IMAGE_C2PA_KEY (its PEM private
key) turn it on. The certificate and key are checked at start-up, before the model loads: a
missing, expired, not-yet-valid or mismatched pair, or a key type C2PA cannot sign with, is one
line and exit code 2; so is a pair the c2pa library itself refuses when it signs a test image.

Each image gets a manifest with one action, `c2pa.created` for text-to-image results or
`c2pa.edited` for edits (the uploaded images as `parentOf` ingredients: their hashes, no pixels),
the IPTC digital source type, and zimage-server and the model as the software agent. The prompt
is left out unless Z_IMAGE_C2PA_INCLUDE_PROMPT is set (prompts can be private). Thumbnails are
off: they cost 45-75 ms an image and carry the pixels again (benchmark 9).

No torch, no HTTP: the routes call `sign` in the encoding pass, in the encoding pool.
"""

from __future__ import annotations

import datetime
import io
import json
import threading
from urllib.parse import urlsplit
from pathlib import Path

from PIL import Image

from . import __version__
from .images import MEDIA_TYPES
from .provenance import EDIT_MODES, digital_source_type
from .settings import Settings, SettingsError

# The c2pa algorithm for each key type it signs with.
EC_ALGORITHMS = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
RSA_ALGORITHM = "ps256"
ED25519_ALGORITHM = "ed25519"
MIN_RSA_BITS = 2048
PROBE_SIZE = (16, 16)  # the test image signed at start-up


class CredentialsError(SettingsError):
    """The C2PA certificate or key cannot be used; the message is one line naming the setting."""


class SigningError(Exception):
    """Signing one image failed (a time-stamping service that did not answer, say)."""


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def signing_algorithm(key) -> str:
    """The c2pa algorithm for a private key, or CredentialsError for a kind C2PA does not sign with."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in EC_ALGORITHMS:
        return EC_ALGORITHMS[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= MIN_RSA_BITS:
        return RSA_ALGORITHM
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return ED25519_ALGORITHM
    described = (
        getattr(getattr(key, "curve", None), "name", None) or f"{type(key).__name__} {getattr(key, 'key_size', '')}"
    )
    raise CredentialsError(
        f"Z_IMAGE_C2PA_KEY: a {described.strip()} key cannot sign C2PA manifests: use EC P-256/P-384/P-521, "
        f"Ed25519 or RSA of at least {MIN_RSA_BITS} bits"
    )


def check_pair(chain_pem: bytes, key_pem: bytes, now: datetime.datetime | None = None) -> tuple[str, bytes]:
    """Check the chain and key belong together and are valid now: the c2pa signing algorithm, and
    the key as PKCS#8 PEM (c2pa reads no other form; `openssl ecparam -genkey` writes SEC1)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise CredentialsError("Z_IMAGE_C2PA_CERT: not a PEM certificate chain") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(f"Z_IMAGE_C2PA_KEY: not an unencrypted PEM private key ({exc})") from None
    leaf, now = chain[0], now or datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        raise CredentialsError(
            f"Z_IMAGE_C2PA_CERT: the signing certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    if leaf.not_valid_before_utc > now:
        raise CredentialsError(
            f"Z_IMAGE_C2PA_CERT: the signing certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d}"
        )
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
        raise CredentialsError(
            "Z_IMAGE_C2PA_KEY does not match the signing certificate (the first in Z_IMAGE_C2PA_CERT)"
        )
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return signing_algorithm(key), pkcs8


class ContentCredentials:
    """Signs encoded images with one configured signer; safe to call from several threads."""

    def __init__(self, chain_pem: bytes, key_pem: bytes, tsa_url: str | None, include_prompt: bool):
        import c2pa

        algorithm, key_pem = check_pair(chain_pem, key_pem)
        info = c2pa.C2paSignerInfo(
            alg=algorithm.encode(),
            sign_cert=chain_pem,
            private_key=key_pem,
            ta_url=tsa_url.encode() if tsa_url else None,
        )
        self._c2pa = c2pa
        self._lock = threading.Lock()  # one native signer: one signature at a time (1-4 ms each)
        self.include_prompt = include_prompt
        try:
            self._signer = c2pa.Signer.from_info(info)
            self._context = c2pa.Context(c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
            self._probe()
        except (c2pa.C2paError, SigningError) as exc:
            raise CredentialsError(f"Z_IMAGE_C2PA_CERT: the c2pa library cannot sign with it: {exc}") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> ContentCredentials | None:
        """The signer the settings ask for; None when neither certificate nor key is set."""
        cert, key = settings.c2pa_cert, settings.c2pa_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            missing = "Z_IMAGE_C2PA_CERT" if cert is None else "Z_IMAGE_C2PA_KEY"
            raise CredentialsError(f"{missing} is not set: signing needs both a certificate chain and its key")
        tsa = settings.c2pa_tsa_url
        if tsa is not None and (urlsplit(tsa).scheme not in ("http", "https") or not urlsplit(tsa).hostname):
            raise CredentialsError(f"Z_IMAGE_C2PA_TSA_URL={tsa!r} is not an http(s) URL")
        return cls(
            _read(cert, "Z_IMAGE_C2PA_CERT"),
            _read(key, "Z_IMAGE_C2PA_KEY"),
            settings.c2pa_tsa_url,
            settings.c2pa_include_prompt,
        )

    def _probe(self) -> None:
        """Sign a tiny image now, so a pair the c2pa library refuses fails the start, not a request."""
        buffer = io.BytesIO()
        Image.new("RGB", PROBE_SIZE).save(buffer, format="PNG")
        self.sign(buffer.getvalue(), "png", mode="generate", model_name="probe", prompt=None)

    def manifest(self, mode: str, model_name: str, prompt: str | None, ingredients: int = 0) -> dict:
        """One action: `c2pa.created`, or for an edit `c2pa.opened` on the uploads (C2PA requires an
        edit's first action to open its parent) then `c2pa.edited`, with the digital source type."""
        agent = {"name": "zimage-server", "version": __version__}
        parameters = {"model": model_name} | ({"prompt": prompt} if self.include_prompt and prompt else {})
        source = {"digitalSourceType": digital_source_type(mode), "softwareAgent": agent, "parameters": parameters}
        if mode in EDIT_MODES and ingredients:
            labels = [f"input-{index + 1}" for index in range(ingredients)]
            actions = [
                {"action": "c2pa.opened", "softwareAgent": agent, "parameters": {"ingredientIds": labels}},
                {"action": "c2pa.edited"} | source,
            ]
        else:
            # An edit whose uploads c2pa cannot hash is still marked as made by a model from a capture.
            actions = [{"action": "c2pa.created"} | source]
        return {
            "claim_generator_info": [{"name": "zimage-server", "version": __version__}],
            "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}],
        }

    def sign(
        self,
        blob: bytes,
        output_format: str,
        *,
        mode: str,
        model_name: str,
        prompt: str | None,
        uploads: tuple[bytes, ...] = (),
    ) -> bytes:
        """`blob` (an encoded image) with a signed manifest embedded."""
        c2pa = self._c2pa
        hashable = [(data, media_type) for data in uploads if (media_type := upload_media_type(data)) is not None]
        manifest = json.dumps(self.manifest(mode, model_name, prompt, len(hashable)))
        signed = io.BytesIO()
        try:
            with self._lock, c2pa.Builder(manifest, context=self._context) as builder:
                for index, (data, media_type) in enumerate(hashable):
                    label = f"input-{index + 1}"
                    ingredient = {"title": f"input {index + 1}", "relationship": "parentOf", "label": label}
                    builder.add_ingredient(json.dumps(ingredient), media_type, io.BytesIO(data))
                builder.sign(self._signer, MEDIA_TYPES[output_format], io.BytesIO(blob), signed)
        except c2pa.C2paError as exc:
            raise SigningError(f"{type(exc).__name__}: {exc}") from None
        return signed.getvalue()


def upload_media_type(data: bytes) -> str | None:
    """The media type of an uploaded image c2pa can take as an ingredient (PNG, JPEG, WebP), else None."""
    try:
        image_format = (Image.open(io.BytesIO(data)).format or "").lower()
    except OSError:
        return None
    return MEDIA_TYPES.get(image_format)


def read_credentials(data: bytes, media_type: str, trust_anchors: str | None = None) -> dict | None:
    """What c2pa's Reader says of a file's manifest: validation state, failures, the active
    manifest's claim generator and actions; None when the file has no manifest. With PEM
    `trust_anchors` the signer's chain is checked against them (state `Trusted` when it holds)."""
    import c2pa

    settings = {"verify": {"verify_trust": True}, "trust": {"trust_anchors": trust_anchors}} if trust_anchors else {}
    try:
        context = c2pa.Context(c2pa.Settings.from_dict(settings)) if settings else None
    except c2pa.C2paError as exc:
        raise CredentialsError(f"the trust anchors are not usable PEM certificates: {exc}") from None
    try:
        with c2pa.Reader(media_type, io.BytesIO(data), context=context) as reader:
            report = json.loads(reader.json())
    except c2pa.C2paError as exc:
        if "ManifestNotFound" in type(exc).__name__ or "no JUMBF" in str(exc) or "not found" in str(exc).lower():
            return None
        return {"validation_state": "Invalid", "failures": [str(exc)]}
    manifest = report.get("manifests", {}).get(report.get("active_manifest"), {})
    actions = [
        action.get("action")
        for assertion in manifest.get("assertions", [])
        if assertion.get("label", "").startswith("c2pa.actions")
        for action in assertion.get("data", {}).get("actions", [])
    ]
    return {
        "validation_state": report.get("validation_state"),
        "failures": [status.get("code") for status in report.get("validation_status", [])],
        "claim_generator": [info.get("name") for info in manifest.get("claim_generator_info", [])],
        "actions": actions,
    }
