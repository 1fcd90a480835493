"""`zimage-server serve | download | plan`: flags built from the settings table, errors as one line on stderr
(in the log format for serve and download)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import os
import signal
import sys
from pathlib import Path

from . import logs
from .model_layout import CheckpointError, IncompleteModelError, verify_model_dir
from .settings import MASK, SETTINGS, Settings, SettingsError, load_settings

EXIT_BAD_SETTING = 2
EXIT_NO_MODEL = 3  # the model folder, or the Z_IMAGE_TRANSFORMER file, is missing or unusable
EXIT_DOWNLOAD_FAILED = 4
EXIT_START_FAILED = 5  # loading or warming up the model failed, or the port could not be bound
EXIT_WORKER_DIED = 6  # the batcher's worker stopped: restart the process
EXIT_INTERRUPTED = 130
# The settings `download` takes; the rest are about serving.
DOWNLOAD_SETTINGS = (
    "models_dir", "variant", "model_id", "download_source", "lora_dir", "upscaler_dir", "log_format", "log_level"
)


def add_setting_flags(parser: argparse.ArgumentParser, fields: tuple[str, ...] | None = None) -> None:
    """One flag per setting (or per named field), its help naming the env var and the default."""
    for spec in SETTINGS:
        if fields is not None and spec.field not in fields:
            continue
        default = spec.default
        current = os.environ.get(spec.env)
        shown = "unset" if default in (None, ()) else f"{default}"
        env_names = " or ".join((spec.env, *spec.also_env))
        shown_current = MASK if spec.secret else repr(current)
        env_note = f"; now {shown_current} from env" if current is not None else ""
        help_text = f"{spec.help} [env {env_names}, default {shown}{env_note}]"
        # Raw strings here; load_settings parses and validates flags and env vars alike.
        # A switch stores "1" when given, so that it parses like its env var.
        takes = {"action": "store_const", "const": "1"} if spec.switch else {"metavar": "VALUE"}
        parser.add_argument(spec.flag, *spec.aliases, dest=spec.field, help=help_text, **takes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zimage-server", description="Serve Z-Image over the OpenAI Images API.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="load the model and serve HTTP")
    add_setting_flags(serve)
    download = commands.add_parser(
        "download",
        help="fetch the model into MODELS_DIR/z-image-<variant> from Hugging Face or ModelScope",
        description="Fetch only what the pipeline loads, resumably, into MODELS_DIR/z-image-<variant>; "
        "the folder appears only once complete and verified. A second run verifies and returns.",
    )
    add_setting_flags(download, DOWNLOAD_SETTINGS)
    download.add_argument("--revision", help="branch, tag or commit to fetch [default: the repo's default branch]")
    download.add_argument(
        "--lora",
        metavar="REPO_ID",
        help="fetch a LoRA file from this hub repo into the LoRA folder instead of the model",
    )
    download.add_argument("--file", help="with --lora: the file in the repo [default: its only .safetensors file]")
    download.add_argument(
        "--transformer",
        metavar="REPO_ID:FILENAME",
        help="fetch this single-file transformer (.safetensors or .gguf) into MODELS_DIR/transformers, and the "
        "model folder without its own transformer weights",
    )
    download.add_argument(
        "--without-transformer-weights",
        action="store_true",
        help="fetch the model folder without its transformer weights, for a Z_IMAGE_TRANSFORMER file you already "
        "have (what serve's fetch-on-start does when Z_IMAGE_TRANSFORMER is set)",
    )
    download.add_argument(
        "--controlnet",
        metavar="REPO_ID:FILENAME",
        help="fetch this ControlNet checkpoint (.safetensors) into MODELS_DIR/controlnets instead of the model",
    )
    download.add_argument(
        "--upscaler",
        metavar="REPO_ID:FILENAME",
        help="fetch this upscaler model (.safetensors or .pth, e.g. a Real-ESRGAN or 4x-UltraSharp file) into "
        "the upscaler folder (Z_IMAGE_UPSCALER_DIR, default MODELS_DIR/upscalers) instead of the model",
    )
    download.add_argument("--verbose", action="store_true", help="log the hub libraries' detail and tracebacks")
    plan = commands.add_parser(
        "plan",
        help="predict peak GPU memory per offload mode for a card, and the settings to use (no weights needed)",
        description="Predict each offload mode's peak GPU memory for the full-size model from the committed memory "
        "model (docs/benchmarks.md, benchmark 7), with a margin for the CUDA context, cuDNN workspace and "
        "fragmentation, and say which settings fit. Assumes bf16 compute, 512-token prompts and "
        "flash/memory-efficient attention.",
    )
    plan.add_argument("--gpu-memory", default="24GiB", type=parse_bytes,
                      help="the card's memory, e.g. 24GiB, 16GB (10^9), 12288MiB [default: 24GiB]")
    plan.add_argument("--size", default="1024x1024", type=parse_size, help="WIDTHxHEIGHT [default: 1024x1024]")
    plan.add_argument("--batch", default=1, type=int, help="images per pipeline call [default: 1]")
    plan.add_argument("--transformer", default="bf16", metavar="FILE_OR_FORMAT",
                      help="a transformer file (.gguf or .safetensors, its tensor types read from the header) or a "
                      "format: bf16, fp16, fp32, int8, fp8, q8_0, q6_k, q5_k, q4_k, q5_1, q5_0, q4_1, q4_0 [default: bf16]")
    plan.add_argument("--quantize", metavar="SPEC",
                      help="as Z_IMAGE_QUANTIZE: int8 or fp8 (transformer and text encoder), or per component, "
                      "e.g. text_encoder=int8 [default: none]")
    plan.add_argument("--controlnet", metavar="FILE", type=Path,
                      help="a ControlNet checkpoint (.safetensors) served beside the model: its weights count too")
    plan.add_argument("--upscaler", metavar="FILE", type=Path,
                      help="an upscaler model (.safetensors or .pth) the hires fix runs: its weights stay resident, "
                      "and a 512 px tile's activations count in an upscale stage")
    plan.add_argument("--enhance-tokens", type=int, default=400, metavar="N",
                      help="the resident prompt enhancer's new-token budget (Z_IMAGE_ENHANCE_MAX_TOKENS): its KV "
                      "cache counts in an enhance stage; 0 with Z_IMAGE_PROMPT_ENHANCER off or a URL [default: 400]")
    plan.add_argument("--json", action="store_true", help="print the rows as a JSON list of objects")
    inspect = commands.add_parser(
        "inspect",
        help="print the provenance marks found in an image file: XMP source type, C2PA manifest and validation",
        description="Read a PNG, JPEG or WebP file and print every provenance mark in it: the XMP digital "
        "source type, AI system and creator tool, and the C2PA manifest's validation state and actions "
        "(docs/provenance.md). No invisible watermark is written or checked.",
    )
    inspect.add_argument("file", type=Path, help="the image file")
    inspect.add_argument("--trust-anchors", type=Path, metavar="PEM",
                         help="CA certificates to trust when validating the C2PA signer [default: trust none]")
    inspect.add_argument("--json", action="store_true", help="print the findings as one JSON object")
    return parser


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "g": 2**30}


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 24GiB, 16GB, 12288MiB)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1024x1024)")
    return int(match.group(1)), int(match.group(2))


def plan(args: argparse.Namespace) -> None:
    from .memory_plan import GIB, choose
    from .memory_plan import plan as plan_rows

    width, height = args.size

    def rows_for(transformer: str, quantize: str | None):
        return plan_rows(args.gpu_memory, width, height, args.batch, transformer, quantize, controlnet=args.controlnet,
                         upscaler=args.upscaler, enhance_tokens=args.enhance_tokens)

    try:
        rows = rows_for(args.transformer, args.quantize)
    except (ValueError, OSError, CheckpointError) as exc:
        fail(str(exc), EXIT_BAD_SETTING)
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    first = rows[0]
    print(f"full-size Z-Image, transformer {first.transformer}{f', quantized {first.quantize}' if first.quantize else ''}, "
          f"{width}x{height} x{args.batch}, {args.gpu_memory / GIB:.2f} GiB card, {first.margin_bytes / GIB:.2f} GiB margin:")
    if args.upscaler is not None:
        from .memory_plan import upscaler_sizes

        weights, tile = upscaler_sizes(args.upscaler)
        print(f"  with upscaler {args.upscaler.stem}: {weights / GIB:.2f} GiB of weights resident, "
              f"{tile / GIB:.2f} GiB for a 512 px tile")
    for row in rows:
        print(f"  {row.offload:<13} {row.predicted_peak_bytes / GIB:6.2f} GiB  {'fits' if row.fits else 'does not fit':<12}"
              f" peak in {row.limiting_stage}, VAE slicing {'on' if row.vae_slicing else 'off'}")
    chosen, _ = choose(rows)
    if chosen.fits:
        print(f"use: Z_IMAGE_OFFLOAD={chosen.offload} (auto picks it; VAE slicing {'on' if chosen.vae_slicing else 'off'})")
        if chosen.offload != "none" and args.quantize is None and args.transformer in ("bf16", "fp16", "fp32"):
            resident = rows_for(args.transformer, "int8")[0]
            if resident.fits:
                print(f"or everything resident, nothing streamed per prompt: Z_IMAGE_QUANTIZE=int8 "
                      f"(transformer and text encoder), Z_IMAGE_OFFLOAD=none, ~{resident.predicted_peak_bytes / GIB:.2f} GiB")
        return
    # Nothing fits as given: the least quantized configuration that does, if any.
    candidates = [("bf16", "int8"), ("fp8", "text_encoder=int8")] + [
        (name, "text_encoder=int8") for name in ("q8_0", "q6_k", "q5_k", "q4_k", "q4_0")
    ]
    for transformer, quantize in candidates:
        candidate, _ = choose(rows_for(transformer, quantize))
        if candidate.fits:
            how = (f"Z_IMAGE_QUANTIZE={quantize}" if transformer == "bf16"
                   else f"a {transformer} transformer (Z_IMAGE_TRANSFORMER) with Z_IMAGE_QUANTIZE={quantize}")
            print(f"nothing fits as given; {how} does: Z_IMAGE_OFFLOAD={candidate.offload}, "
                  f"~{candidate.predicted_peak_bytes / GIB:.2f} GiB")
            return
    print("nothing fits, even with a 4-bit transformer and an int8 text encoder; use a smaller size or batch")


def fail(message: str, code: int) -> None:
    """One line on stderr, then exit `code`: a log record in the process's format once logging is set
    up (serve, download), else `zimage-server: message` (plan, which prints for a person)."""
    if logs.configured():
        logging.getLogger("zimage_server.cli").critical(message)
    else:
        print(f"zimage-server: {message}", file=sys.stderr)
    raise SystemExit(code)


def configure_logging_without_settings(args: argparse.Namespace) -> None:
    """Logging for reporting a settings error: the log format and level asked for (flag, else env
    var) where those two are valid themselves, else text at info."""
    chosen = {}
    for spec in SETTINGS:
        if spec.field in ("log_format", "log_level"):
            value = getattr(args, spec.field, None) or os.environ.get(spec.env) or spec.default
            chosen[spec.field] = str(value).lower()
    log_format = chosen["log_format"] if chosen["log_format"] in logs.LOG_FORMATS else "text"
    logs.configure_logging(log_format, chosen["log_level"] if chosen["log_level"] in logs.LOG_LEVELS else "info")


def missing_model_message(settings: Settings, reason: str) -> str:
    return (
        f"no usable model at {settings.model_dir} ({reason}); "
        f"fetch it with: zimage-server download --variant {settings.variant}"
    )


def serve(args: argparse.Namespace) -> None:
    from .download import DownloadError, fetch_in_subprocess, repo_id_for

    try:
        settings = load_settings(overrides={spec.field: getattr(args, spec.field) for spec in SETTINGS})
    except SettingsError as exc:
        configure_logging_without_settings(args)
        fail(str(exc), EXIT_BAD_SETTING)
    logs.configure_logging(settings.log_format, settings.log_level)
    fetch_model = None
    try:
        verify_model_dir(settings.model_dir, weights_elsewhere=("transformer",) if settings.transformer else ())
    except IncompleteModelError as exc:
        # Fetch only into a folder that is not there: an incomplete one is someone's half copy.
        if settings.offline or settings.model_dir.exists():
            fail(missing_model_message(settings, str(exc)), EXIT_NO_MODEL)
        try:
            repo_id_for(settings)
        except DownloadError as no_repo:
            fail(str(no_repo), EXIT_NO_MODEL)
        fetch_model = fetch_in_subprocess
    controlnet = settings.controlnet_path
    if controlnet is not None and not (controlnet.is_dir() or controlnet.is_file()):
        fail(f"no ControlNet at {controlnet} (Z_IMAGE_CONTROLNET): give a .safetensors file or a diffusers folder; "
             "a relative path is under MODELS_DIR/controlnets", EXIT_NO_MODEL)
    # Imported only now, so that a wrong setting or a missing model is reported without loading torch.
    from .faults import FaultInjector
    from .runner import preflight

    from .content_credentials import ContentCredentials
    from .index import IndexUnavailable
    from .keys import ApiKeys, KeysFileError

    logs.route_model_library_logs()
    try:
        ContentCredentials.from_settings(settings)  # the C2PA certificate and key: before any weights load
        ApiKeys.load(settings.api_key, settings.api_keys_file)
        preflight(settings)  # device, attention backend, quantization, transformer file: before any weights load
        check_gallery(settings)  # the store's folder and the index (created or upgraded now)
    except (SettingsError, KeysFileError, IndexUnavailable) as exc:
        fail(str(exc), EXIT_BAD_SETTING)
    except CheckpointError as exc:
        fail(str(exc), EXIT_NO_MODEL)

    from .api import create_app
    from .api.shutdown import draining_server

    logging.getLogger("zimage_server").info("settings: %r", settings)
    app = create_app(settings, fetch_model=fetch_model, faults=FaultInjector.from_env())
    server = draining_server(app, settings)
    app.state.server.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.server.worker_died:
        raise SystemExit(EXIT_WORKER_DIED)
    if app.state.server.fatal_error:
        raise SystemExit(EXIT_DOWNLOAD_FAILED)
    if not server.started:
        raise SystemExit(EXIT_START_FAILED)


def check_gallery(settings: Settings) -> None:
    """A folder store must be creatable and the index must open (IndexUnavailable or SettingsError
    otherwise), so that a wrong Z_IMAGE_STORE or Z_IMAGE_DATABASE_URL stops the start in one line.
    An S3 bucket is not probed: one that is down for now must not keep the server from starting."""
    import asyncio

    from .index import open_index

    folder = settings.store_folder
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SettingsError(f"invalid Z_IMAGE_STORE={str(folder)!r}: cannot create the folder ({exc.strerror})")
    if settings.index_url is not None:

        async def probe() -> None:
            await (await open_index(settings.index_url)).close()

        asyncio.run(probe())


def exit_on_signal(signum: int, _frame: object) -> None:
    # The hub libraries' worker threads would finish their files before the process could exit;
    # what is on disk is where the next run continues from, so leave at once. (Logging's handler lock
    # is reentrant, so this cannot deadlock on a record the main thread was writing.)
    logging.getLogger("zimage_server.cli").warning("download interrupted; rerun the same command to continue")
    os._exit(EXIT_INTERRUPTED)


def download(args: argparse.Namespace) -> None:
    try:
        settings = load_settings(overrides={field: getattr(args, field) for field in DOWNLOAD_SETTINGS})
    except SettingsError as exc:
        configure_logging_without_settings(args)
        fail(str(exc), EXIT_BAD_SETTING)
    logs.configure_logging(settings.log_format, "debug" if args.verbose else settings.log_level)
    if settings.offline:
        fail("offline mode is on (Z_IMAGE_OFFLINE or HF_HUB_OFFLINE); unset it to download", EXIT_DOWNLOAD_FAILED)
    progress_bars = sys.stderr.isatty()
    if not progress_bars:
        # Bars written to a log are carriage-return noise; tqdm reads this when first imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGINT, exit_on_signal)
    signal.signal(signal.SIGTERM, exit_on_signal)

    from .download import DownloadError, download_file, download_model

    # One file instead of the model, by its flag (the first given, in this order).
    named = [(kind, value) for kind in ("controlnet", "upscaler", "transformer") if (value := getattr(args, kind))]
    for kind, value in named:
        if ":" not in value:
            fail(f"--{kind} {value!r}: expected REPO_ID:FILENAME, e.g. owner/repo:file.safetensors", EXIT_BAD_SETTING)
    try:
        if args.lora:
            download_file(settings, "lora", args.lora, args.file, revision=args.revision, progress_bars=progress_bars)
        elif named:
            kind, value = named[0]
            repo_id, filename = value.split(":", 1)
            download_file(settings, kind, repo_id, filename, revision=args.revision, progress_bars=progress_bars)
            if kind == "transformer":
                # The folder's own transformer weights (24.6 GB for Turbo) would never be loaded.
                download_model(settings, progress_bars=progress_bars, weights_elsewhere=("transformer",))
        else:
            elsewhere = ("transformer",) if args.without_transformer_weights else ()
            download_model(settings, revision=args.revision, progress_bars=progress_bars, weights_elsewhere=elsewhere)
    except Exception as exc:
        if args.verbose:
            logging.getLogger("zimage_server.download").exception("download failed")
        if isinstance(exc, DownloadError):
            fail(str(exc), EXIT_DOWNLOAD_FAILED)
        fail(f"download failed ({logs.first_line(exc)}); rerun with --verbose for details", EXIT_DOWNLOAD_FAILED)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args)
    elif args.command == "download":
        download(args)
    elif args.command == "plan":
        plan(args)
    elif args.command == "inspect":
        inspect_file(args)


def inspect_file(args: argparse.Namespace) -> None:
    """`zimage-server inspect FILE`: the marks found, for a person or (--json) a program."""
    from PIL import Image, UnidentifiedImageError

    from .content_credentials import CredentialsError, read_credentials
    from .images import MEDIA_TYPES
    from .provenance import read_xmp_marks

    try:
        data = args.file.read_bytes()
        anchors = args.trust_anchors.read_text() if args.trust_anchors else None
        with Image.open(io.BytesIO(data)) as image:
            image_format, size = (image.format or "").lower(), image.size
    except UnicodeDecodeError:
        fail(f"cannot inspect {args.file}: {args.trust_anchors} is not a PEM text file", EXIT_BAD_SETTING)
    except OSError as exc:  # UnidentifiedImageError included
        kind = "not an image Pillow can read" if isinstance(exc, UnidentifiedImageError) else exc.strerror or exc
        fail(f"cannot inspect {args.file}: {kind}", EXIT_BAD_SETTING)
    if image_format not in MEDIA_TYPES:
        fail(f"cannot inspect {args.file}: a {image_format or 'unknown'} file; marks are read from PNG, JPEG and WebP",
             EXIT_BAD_SETTING)
    found = {
        "file": str(args.file),
        "format": image_format,
        "size": f"{size[0]}x{size[1]}",
        "xmp": read_xmp_marks(data),
    }
    try:
        found["c2pa"] = read_credentials(data, MEDIA_TYPES[image_format], anchors)
    except CredentialsError as exc:
        fail(f"cannot inspect {args.file}: {exc}", EXIT_BAD_SETTING)
    if args.json:
        print(json.dumps(found, indent=2))
        return
    print(f"{found['file']}: {image_format}, {found['size']}")
    xmp = found["xmp"]
    print("XMP: " + (", ".join(f"{key} {value}" for key, value in xmp.items()) if xmp else "XMP: none"))
    c2pa = found["c2pa"]
    if c2pa is None:
        print("C2PA: no manifest")
    else:
        failures = f" ({', '.join(c2pa['failures'])})" if c2pa["failures"] else ""
        print(f"C2PA: {c2pa['validation_state']}{failures}; actions {', '.join(c2pa.get('actions') or []) or 'none'}")


if __name__ == "__main__":
    main()
