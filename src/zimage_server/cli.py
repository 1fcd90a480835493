"""`zimage-server serve | download`: flags built from the settings table, errors as one line on stderr."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import logs
from .model_layout import IncompleteModelError, verify_model_dir
from .settings import MASK, SETTINGS, Settings, SettingsError, load_settings

EXIT_BAD_SETTING = 2
EXIT_NO_MODEL = 3  # the model folder, or the Z_IMAGE_TRANSFORMER file, is missing or unusable
EXIT_DOWNLOAD_FAILED = 4
EXIT_START_FAILED = 5  # loading or warming up the model failed, or the port could not be bound
EXIT_WORKER_DIED = 6  # the batcher's worker stopped: restart the process
EXIT_INTERRUPTED = 130
# The settings `download` takes; the rest are about serving.
DOWNLOAD_SETTINGS = ("models_dir", "variant", "model_id", "download_source", "lora_dir", "log_format", "log_level")


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
        "--controlnet",
        metavar="REPO_ID:FILENAME",
        help="fetch this ControlNet checkpoint (.safetensors) into MODELS_DIR/controlnets instead of the model",
    )
    download.add_argument("--verbose", action="store_true", help="log the hub libraries' detail and tracebacks")
    return parser


def fail(message: str, code: int) -> None:
    print(f"zimage-server: {message}", file=sys.stderr)
    raise SystemExit(code)


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
    from .checkpoints import CheckpointError
    from .faults import FaultInjector
    from .runner import preflight

    logs.route_model_library_logs()
    try:
        preflight(settings)  # device, attention backend, quantization, transformer file: before any weights load
    except SettingsError as exc:
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


def exit_on_signal(signum: int, _frame: object) -> None:
    # The hub libraries' worker threads would finish their files before the process could exit;
    # what is on disk is where the next run continues from, so leave at once.
    print("zimage-server: download interrupted; rerun the same command to continue", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def download(args: argparse.Namespace) -> None:
    try:
        settings = load_settings(overrides={field: getattr(args, field) for field in DOWNLOAD_SETTINGS})
    except SettingsError as exc:
        fail(str(exc), EXIT_BAD_SETTING)
    if settings.offline:
        fail("offline mode is on (Z_IMAGE_OFFLINE or HF_HUB_OFFLINE); unset it to download", EXIT_DOWNLOAD_FAILED)
    logs.configure_logging(settings.log_format, "debug" if args.verbose else settings.log_level)
    progress_bars = sys.stderr.isatty()
    if not progress_bars:
        # Bars written to a log are carriage-return noise; tqdm reads this when first imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGINT, exit_on_signal)
    signal.signal(signal.SIGTERM, exit_on_signal)

    from .download import DownloadError, download_controlnet, download_lora, download_model, download_transformer

    for flag, value in (("--transformer", args.transformer), ("--controlnet", args.controlnet)):
        if value and ":" not in value:
            fail(f"{flag} {value!r}: expected REPO_ID:FILENAME, e.g. owner/repo:file.safetensors", EXIT_BAD_SETTING)
    try:
        if args.lora:
            download_lora(settings, args.lora, args.file, revision=args.revision, progress_bars=progress_bars)
        elif args.controlnet:
            repo_id, filename = args.controlnet.split(":", 1)
            download_controlnet(settings, repo_id, filename, revision=args.revision, progress_bars=progress_bars)
        elif args.transformer:
            repo_id, filename = args.transformer.split(":", 1)
            download_transformer(settings, repo_id, filename, revision=args.revision, progress_bars=progress_bars)
            # The folder's own transformer weights (24.6 GB for Turbo) would never be loaded.
            download_model(settings, progress_bars=progress_bars, weights_elsewhere=("transformer",))
        else:
            download_model(settings, revision=args.revision, progress_bars=progress_bars)
    except Exception as exc:
        if args.verbose:
            logging.getLogger("zimage_server.download").exception("download failed")
        if isinstance(exc, DownloadError):
            fail(str(exc), EXIT_DOWNLOAD_FAILED)
        detail = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        fail(f"download failed ({detail}); rerun with --verbose for details", EXIT_DOWNLOAD_FAILED)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args)
    elif args.command == "download":
        download(args)


if __name__ == "__main__":
    main()
