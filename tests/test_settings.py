"""Settings from env and flags, every one of them, and how `zimage-server serve` fails before loading anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zimage_server.cli import build_parser
from zimage_server.settings import SETTINGS, Settings, SettingsError, load_settings

KEY = "sk-test-0123456789"


def test_defaults_match_the_documented_ones():
    settings = load_settings(env={})
    assert settings == Settings()
    assert (settings.variant, settings.max_batch_size, settings.max_queue, settings.max_n) == ("turbo", 4, 32, 4)
    assert settings.max_pixels == 2048 * 2048 and settings.request_timeout_s == 300


def test_env_vars_then_flags_take_effect():
    env = {"Z_IMAGE_VARIANT": "base", "Z_IMAGE_MAX_BATCH_SIZE": "8", "MODELS_DIR": "/srv/models"}
    settings = load_settings(env=env, overrides={"max_batch_size": "2"})
    assert settings.variant == "base" and settings.max_batch_size == 2
    assert settings.model_dir == Path("/srv/models/z-image-base")


def test_model_id_naming_a_local_folder_is_loaded_from_there(tmp_path):
    settings = load_settings(env={"Z_IMAGE_MODEL_ID": str(tmp_path)})
    assert settings.model_dir == tmp_path


@pytest.mark.parametrize(
    "env, names",
    [
        ({"Z_IMAGE_VARIANT": "turbo2"}, "Z_IMAGE_VARIANT"),
        ({"Z_IMAGE_MAX_BATCH_SIZE": "0"}, "Z_IMAGE_MAX_BATCH_SIZE"),
        ({"Z_IMAGE_MAX_QUEUE": "many"}, "Z_IMAGE_MAX_QUEUE"),
        ({"Z_IMAGE_DTYPE": "int8"}, "Z_IMAGE_DTYPE"),
        ({"Z_IMAGE_REQUEST_TIMEOUT_S": "0"}, "Z_IMAGE_REQUEST_TIMEOUT_S"),
        ({"Z_IMAGE_BATCH_WAIT_MS": "nan"}, "Z_IMAGE_BATCH_WAIT_MS"),
        ({"Z_IMAGE_MAX_N": "8", "Z_IMAGE_MAX_QUEUE": "4"}, "Z_IMAGE_MAX_N"),
    ],
)
def test_bad_values_name_the_setting(env, names):
    with pytest.raises(SettingsError, match=names):
        load_settings(env=env)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not (k.startswith("Z_IMAGE_") or k == "MODELS_DIR")}
    return subprocess.run(
        [sys.executable, "-m", "zimage_server.cli", *args],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_help_lists_every_setting_with_its_env_var():
    result = run_cli("serve", "--help", env={})
    assert result.returncode == 0
    for spec in SETTINGS:
        assert spec.flag in result.stdout and spec.env in result.stdout


def test_bad_setting_is_one_line_on_stderr_and_a_nonzero_exit(tmp_path):
    result = run_cli("serve", "--max-queue", "-3", env={"MODELS_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--max-queue" in result.stderr


def test_missing_model_folder_names_the_path_and_the_download_command(tmp_path):
    # Offline: otherwise the server would start and fetch the model (tests/test_download.py).
    result = run_cli("serve", env={"MODELS_DIR": str(tmp_path), "Z_IMAGE_VARIANT": "base", "Z_IMAGE_OFFLINE": "1"})
    assert result.returncode == 3
    line = result.stderr.strip()
    assert "\n" not in line
    assert str(tmp_path / "z-image-base") in line and "zimage-server download --variant base" in line


def test_offline_and_source_settings():
    assert load_settings(env={"HF_HUB_OFFLINE": "1"}).offline is True
    assert load_settings(env={"HF_HUB_OFFLINE": "1", "Z_IMAGE_OFFLINE": "0"}).offline is False
    assert load_settings(env={}, overrides={"download_source": "modelscope"}).download_source == "modelscope"
    assert Settings().download_source == "huggingface" and Settings().offline is False


def test_operations_settings_parse_and_the_api_key_is_never_shown():
    settings = load_settings(
        {
            "Z_IMAGE_API_KEY": KEY,
            "Z_IMAGE_CORS_ORIGINS": "https://a.example, http://localhost:3000/",
            "Z_IMAGE_DRAIN_TIMEOUT_S": "5",
        }
    )
    assert settings.api_key == KEY and settings.drain_timeout_s == 5
    assert settings.cors_origins == ("https://a.example", "http://localhost:3000")
    assert KEY not in repr(settings) and "api_key='***'" in repr(settings)
    assert load_settings({}).api_key is None and load_settings({}).cors_origins == ()
    with pytest.raises(SettingsError, match="Z_IMAGE_CORS_ORIGINS"):
        load_settings({"Z_IMAGE_CORS_ORIGINS": "a.example"})
    with pytest.raises(SettingsError, match="Z_IMAGE_DRAIN_TIMEOUT_S"):
        load_settings({"Z_IMAGE_DRAIN_TIMEOUT_S": "-1"})


def test_serve_help_masks_the_api_key_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("Z_IMAGE_API_KEY", KEY)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "Z_IMAGE_API_KEY" in out and KEY not in out


def test_new_settings_parse_and_default():
    settings = load_settings(env={})
    assert (settings.offload, settings.attention, settings.compile, settings.prompt_cache) == ("auto", "auto", "off", 64)
    env = {"Z_IMAGE_OFFLOAD": "text_encoder", "Z_IMAGE_ATTENTION": "_native_cudnn", "Z_IMAGE_COMPILE": "Regional"}
    settings = load_settings(env=env, overrides={"prompt_cache": "0"})
    assert (settings.offload, settings.attention, settings.compile, settings.prompt_cache) == (
        "text_encoder",
        "_native_cudnn",
        "regional",
        0,
    )


@pytest.mark.parametrize(
    "env, name",
    [
        ({"Z_IMAGE_OFFLOAD": "sequential"}, "Z_IMAGE_OFFLOAD"),
        ({"Z_IMAGE_COMPILE": "max"}, "Z_IMAGE_COMPILE"),
        ({"Z_IMAGE_PROMPT_CACHE": "-1"}, "Z_IMAGE_PROMPT_CACHE"),
        ({"Z_IMAGE_ATTENTION": "flash attn"}, "Z_IMAGE_ATTENTION"),
    ],
)
def test_bad_acceleration_settings_name_the_setting(env, name):
    with pytest.raises(SettingsError, match=name):
        load_settings(env=env)


def test_upload_limit_and_edit_dtype_settings():
    assert load_settings({}).max_upload_bytes == 20 * 1024 * 1024
    assert load_settings({"Z_IMAGE_MAX_UPLOAD_BYTES": "1048576"}).max_upload_bytes == 1048576
    with pytest.raises(SettingsError, match="Z_IMAGE_MAX_UPLOAD_BYTES"):
        load_settings({"Z_IMAGE_MAX_UPLOAD_BYTES": "lots"})
    with pytest.raises(SettingsError, match="bf16"):
        load_settings({"Z_IMAGE_VARIANT": "edit", "Z_IMAGE_DTYPE": "fp32"})


def test_sdapi_sampling_and_model_aliases():
    defaults = load_settings({})
    assert defaults.sdapi_sampling == "model"
    assert defaults.model_aliases == ("dall-e-2", "dall-e-3", "gpt-image-1")
    settings = load_settings({"Z_IMAGE_SDAPI_SAMPLING": "Client", "Z_IMAGE_MODEL_ALIASES": "my-model, other"})
    assert settings.sdapi_sampling == "client" and settings.model_aliases == ("my-model", "other")
    # Empty is strict: a list setting set to nothing is the empty list, not its default.
    assert load_settings({"Z_IMAGE_MODEL_ALIASES": ""}).model_aliases == ()
    assert load_settings({"Z_IMAGE_CORS_ORIGINS": ""}).cors_origins == ()
    with pytest.raises(SettingsError, match="Z_IMAGE_SDAPI_SAMPLING"):
        load_settings({"Z_IMAGE_SDAPI_SAMPLING": "auto"})
