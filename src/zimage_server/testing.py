"""Write a tiny, random-weight Z-Image pipeline in the real diffusers layout.

    python -m zimage_server.testing PATH [--variant turbo|base|edit]

Everything is built offline: the tokenizer is trained here on a few sentences, so no hub access
is needed. The geometry is the real model's (8x VAE downsampling, patch size 2, so 16 pixels per
token side, and rope tables long enough for 4096 pixels a side), so every size the server accepts
runs on it; only the widths are tiny. The tests load it through the same code path as real weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .variants import VARIANT_NAMES, VARIANTS

# Qwen3's chat template, cut down to what ZImagePipeline uses: one user turn, a generation
# prompt, and the empty think block Qwen3 emits when enable_thinking is false.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = [
    "a photo of a cat sitting on a red chair",
    "a watercolor painting of mountains at sunset",
    "portrait of an astronaut, studio lighting, high detail",
    "user assistant system",
]

# The tiny models' configs (the real ones are in ../shared/REFERENCE.md); benchmark 3's --smoke
# builds the same shapes. The text encoder's vocab_size and pad token come from the tokenizer.
TINY_TEXT_ENCODER = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=1024,
)
TINY_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=32,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=16,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 4, 4],
    axes_lens=[1024, 256, 256],
)
# A tiny ZImageControlNetModel over the tiny transformer (its dim, heads and refiner depth):
# control_in_dim 16 is the 1.0 Union layout (control latents only); 33 adds the inpainting mask and
# masked image latents (16 + 1 + 16), the layout of the 2.x Union checkpoints.
TINY_CONTROLNET = dict(
    control_layers_places=[0],
    control_refiner_layers_places=[0],
    add_control_noise_refiner="control_noise_refiner",
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    dim=TINY_TRANSFORMER["dim"],
    n_refiner_layers=TINY_TRANSFORMER["n_refiner_layers"],
    n_heads=TINY_TRANSFORMER["n_heads"],
    n_kv_heads=TINY_TRANSFORMER["n_kv_heads"],
    norm_eps=1e-5,
    qk_norm=True,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE covers every UTF-8 prompt, so distinct prompts give distinct token ids.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_components(variant: str = "turbo", seed: int = 0) -> dict:
    import torch

    from .architecture import TINY, build_models, build_scheduler

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    siglip_dim = 16
    # Omni takes its reference images through a SigLIP2 encoder whose features the transformer reads.
    omni = VARIANTS[variant].edit_method == "omni"
    config = TINY | {"transformer": TINY_TRANSFORMER | {"siglip_feat_dim": siglip_dim}} if omni else TINY
    components = build_models(config, tokenizer) | {"tokenizer": tokenizer, "scheduler": build_scheduler()}
    if omni:
        components.update(build_siglip(siglip_dim))
    return components


def build_siglip(hidden: int) -> dict:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    try:
        # The plain (PIL) processor: the default one needs torchvision, which the CPU torch build lacks.
        from transformers import Siglip2ImageProcessorPil as Siglip2ImageProcessor
    except ImportError:  # transformers from before the PIL/torchvision processor split
        from transformers import Siglip2ImageProcessor

    config = Siglip2VisionConfig(
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        patch_size=16,
        num_patches=256,
    )
    return {"siglip": Siglip2VisionModel(config), "siglip_processor": Siglip2ImageProcessor(patch_size=16)}


MARKER = "TINY_RANDOM_MODEL.json"


class WouldOverwriteRealModel(Exception):
    """PATH already holds a pipeline that this builder did not write: real weights, probably."""


def write_tiny_pipeline(path: str | Path, variant: str = "turbo") -> Path:
    import diffusers

    path = Path(path)
    # Writing over real weights (tens of GB to fetch again) must never happen by accident; a tiny
    # model written here before carries the marker and is rewritten freely.
    if (path / "model_index.json").exists() and not (path / MARKER).exists():
        raise WouldOverwriteRealModel(f"{path} already holds a model that is not a tiny test model; choose another path")
    pipeline = getattr(diffusers, VARIANTS[variant].pipeline_class)(**build_components(variant))
    pipeline.save_pretrained(path, safe_serialization=True)
    # A marker so people (and logs) can tell a tiny random model from real weights.
    (path / MARKER).write_text(json.dumps({"variant": variant, "random_weights": True}) + "\n")
    return path


def write_tiny_controlnet(path: str | Path, inpaint: bool = False, seed: int = 1) -> Path:
    """A tiny random-weight ControlNet folder for the tiny transformer; `inpaint` gives the 2.x layout."""
    import torch
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    controlnet = ZImageControlNetModel(**TINY_CONTROLNET, control_in_dim=33 if inpaint else 16)
    # Random, not zero, output projections: a zero-initialised ControlNet would change nothing.
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if "after_proj" in name or "before_proj" in name:
                parameter.normal_(0, 0.5)
    controlnet.save_pretrained(path, safe_serialization=True)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# A throw-away C2PA signing pair (tests and benchmarks/provenance.py): an EC P-256 CA and a leaf
# shaped as C2PA wants one (critical digitalSignature key usage, an extended key usage, subject
# and authority key identifiers; without the identifiers c2pa calls the certificate invalid).

_USAGE = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
             encipher_only=False, decipher_only=False)  # fmt: skip


def certificate_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tests")])


def make_ca():
    """A self-signed EC P-256 CA valid from yesterday for 30 days: (key, certificate)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(certificate_name("Test CA")).issuer_name(certificate_name("Test CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **_USAGE), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def make_leaf(ca, key=None, *, valid_from=-1, valid_until=30):
    """A signing certificate as C2PA wants one: critical digitalSignature usage, an extended key
    usage, and subject and authority key identifiers."""
    ca_key, ca_cert = ca
    now = datetime.datetime.now(datetime.timezone.utc)
    key = key or ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(certificate_name("zimage-server signer")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=valid_from))
        .not_valid_after(now + datetime.timedelta(days=valid_until))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **_USAGE), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_pair(folder: Path, ca, key, leaf) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chain.pem").write_bytes(pem(leaf) + pem(ca[1]))
    (folder / "key.pem").write_bytes(key_pem(key))
    return folder / "chain.pem", folder / "key.pem"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m zimage_server.testing",
        description="Write a tiny random-weight Z-Image pipeline (diffusers layout) to PATH, offline.",
    )
    parser.add_argument("path", help="folder to write, e.g. models/z-image-turbo")
    parser.add_argument("--variant", choices=VARIANT_NAMES, default="turbo")
    args = parser.parse_args(argv)
    try:
        out = write_tiny_pipeline(args.path, args.variant)
    except WouldOverwriteRealModel as exc:
        raise SystemExit(f"python -m zimage_server.testing: {exc}") from None
    print(f"wrote a tiny random-weight {args.variant} pipeline to {out}")


if __name__ == "__main__":
    main()
