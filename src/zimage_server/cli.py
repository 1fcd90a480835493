"""`zimage-server serve | ...`: flags built from the settings table, errors as one line on stderr."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .model_layout import IncompleteModelError, verify_model_dir
from .settings import SETTINGS, Settings, SettingsError, load_settings

EXIT_BAD_SETTING = 2
EXIT_NO_MODEL = 3


def add_setting_flags(parser: argparse.ArgumentParser, fields: tuple[str, ...] | None = None) -> None:
    """One flag per setting (or per named field), its help naming the env var and the default."""
    defaults = Settings()
    for spec in SETTINGS:
        if fields is not None and spec.field not in fields:
            continue
        default = getattr(defaults, spec.field)
        current = os.environ.get(spec.env)
        shown = f"{default}" if default is not None else "unset"
        env_names = " or ".join((spec.env, *spec.also_env))
        env_note = f"; now {current!r} from env" if current is not None else ""
        help_text = f"{spec.help} [env {env_names}, default {shown}{env_note}]"
        # Raw strings here; load_settings parses and validates flags and env vars alike.
        if spec.switch:
            parser.add_argument(spec.flag, *spec.aliases, dest=spec.field, action="store_const", const="1", help=help_text)
        else:
            parser.add_argument(spec.flag, *spec.aliases, dest=spec.field, metavar="VALUE", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zimage-server", description="Serve Z-Image over the OpenAI Images API.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="load the model and serve HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind [default 127.0.0.1]")
    serve.add_argument("--port", type=int, default=8000, help="port to bind [default 8000]")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_setting_flags(serve)
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
    import uvicorn

    from .api import create_app

    try:
        settings = load_settings(overrides={spec.field: getattr(args, spec.field) for spec in SETTINGS})
    except SettingsError as exc:
        fail(str(exc), EXIT_BAD_SETTING)
    settings = settings.replace(host=args.host, port=args.port)
    try:
        verify_model_dir(settings.model_dir)
    except IncompleteModelError as exc:
        fail(missing_model_message(settings, str(exc)), EXIT_NO_MODEL)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
