"""`zimage-server download` and fetch-on-start, against loopback fakes of Hugging Face and ModelScope.

The real client libraries do the work: each download runs the CLI in a subprocess with
HF_ENDPOINT / MODELSCOPE_ENDPOINT pointing at tests/fake_hubs.py (both libraries read their
endpoint when imported). Every repo also holds files that must not be fetched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import serving
from fake_hubs import FakeHub, FakeRepo
from test_logging import is_failure_line
from zimage_server.download import ProgressLog, RemoteFile, bytes_under, select_files
from zimage_server.settings import Settings

SOURCES = ["huggingface", "modelscope"]
TURBO = "Tongyi-MAI/Z-Image-Turbo"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
# What a hub repo holds besides the pipeline: none of it may be fetched.
DECOYS = {
    "README.md": b"# Z-Image-Turbo\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "assets/showcase.png": b"\x89PNG\r\n\x1a\n" + bytes(4000),
    "transformer/diffusion_pytorch_model.fp16.safetensors": bytes(3000),
    "text_encoder/pytorch_model.bin": bytes(3000),
    "vae/diffusion_pytorch_model.bin": bytes(3000),
}
BIG = 12_000_000  # past huggingface_hub's 10 MB write chunk, so a cut file has bytes on disk
CUT_AT = 11_000_000


@pytest.fixture(scope="module")
def hub(models_dir: Path):
    source = models_dir / "z-image-turbo"
    with FakeHub() as fake:
        turbo = FakeRepo.from_folder(source, DECOYS)
        fake.repos[TURBO] = turbo
        fake.repos["test/big"] = FakeRepo.from_folder(source, {WEIGHTS: os.urandom(BIG)})
        fake.repos["test/gated"] = dataclasses.replace(turbo, gated=True)
        fake.repos["test/huge"] = dataclasses.replace(turbo, reported_sizes={WEIGHTS: 10**15})
        bin_only = {name: data for name, data in turbo.files.items() if name != WEIGHTS}
        fake.repos["test/bin-only"] = FakeRepo(bin_only | {"transformer/diffusion_pytorch_model.bin": bytes(3000)})
        lora = (source / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()  # any safetensors file
        fake.repos["test/lora"] = FakeRepo({"pixel-art.safetensors": lora, "README.md": b"# a LoRA\n"})
        fake.repos["test/loras"] = FakeRepo({"a.safetensors": lora, "b/c.safetensors": lora})
        fake.repos["test/fake-lora"] = FakeRepo({"broken.safetensors": b"PK\x03\x04 not safetensors"})
        fake.repos["test/upscalers"] = FakeRepo(
            {"4x-Tiny.pth": torch_saved({"body.0.weight": bytes(16)}), "2x-Tiny.safetensors": lora, "README.md": b"# x\n",
             "broken.pth": b"<html>not a torch file</html>"}
        )  # fmt: skip
        # Only the first bytes matter to the download (tests/test_checkpoints.py loads real ones).
        fake.repos["test/gguf"] = FakeRepo({"z-image-turbo-Q8_0.gguf": b"GGUF" + bytes(2000), "README.md": b"# quants\n"})
        yield fake


def torch_saved(state: dict[str, bytes]) -> bytes:
    """A zip archive shaped like torch.save's: the download checks only a file's first bytes (the
    server's reading of .pth files is tests/test_upscalers.py's)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in state.items():
            archive.writestr(f"archive/data/{name}", data)
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def fresh_hub(hub: FakeHub):
    hub.reset()


def hub_env(hub_url: str, home: Path) -> dict[str, str]:
    """The environment of a download: both hubs at `hub_url`, caches and credentials under `home`."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("Z_IMAGE_", "HF_", "MODELSCOPE_", "TQDM_"))}
    keep.pop("MODELS_DIR", None)
    return keep | {
        "HF_ENDPOINT": hub_url,
        "HF_HOME": str(home / "hf"),
        "MODELSCOPE_ENDPOINT": hub_url,
        "MODELSCOPE_CACHE": str(home / "ms-cache"),
        "MODELSCOPE_HOME": str(home / "ms-home"),
        # modelscope_hub retries a failed listing with backoff for about 7 s; once is enough here.
        "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1",
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "zimage_server.cli", *args]


def run_download(hub_url: str, tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    command = cli("download", "--models-dir", str(tmp_path / "models"), "--source", source, *args)
    return subprocess.run(command, env=hub_env(hub_url, tmp_path), capture_output=True, text=True, timeout=60)


def assert_one_line_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, result.stderr
    assert is_failure_line(line), line
    for fragment in fragments:
        assert fragment in line


def model_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def pipeline_files(repo: FakeRepo) -> set[str]:
    return {p for p in repo.files if p not in DECOYS and p != "TINY_RANDOM_MODEL.json"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- what is fetched -------------------------------------------------------------------------------


def test_select_files_keeps_what_the_pipeline_loads_and_nothing_else():
    names = [
        "model_index.json",
        "README.md",
        "assets/teaser.jpg",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder/pytorch_model.bin",
        "text_encoder/pytorch_model.bin.index.json",
        "text_encoder/flax_model.msgpack",
        "tokenizer/tokenizer.json",
        "tokenizer/merges.txt",
        "tokenizer/README.md",
        "unused/config.json",
    ]
    chosen = select_files([RemoteFile(name, 1) for name in names], ["transformer", "text_encoder", "tokenizer"])
    assert [f.path for f in chosen] == [
        "model_index.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
    ]


def test_progress_log_reports_bytes_received_against_the_total(tmp_path, caplog):
    caplog.set_level("INFO", logger="zimage_server.download")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "part.incomplete").write_bytes(bytes(250_000))
    with ProgressLog("downloading test/repo", tmp_path, total=1_000_000, every_s=0.05):
        time.sleep(0.3)
    assert "downloading test/repo: 250.0 kB of 1.0 MB (25%)" in caplog.text


# -- downloads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_fresh_download_is_served_and_a_second_run_transfers_nothing(hub, tmp_path, source):
    result = run_download(hub.url, tmp_path, source)
    assert result.returncode == 0, result.stderr
    target = tmp_path / "models" / "z-image-turbo"
    assert model_files(target) == pipeline_files(hub.repos[TURBO])
    assert not (tmp_path / "models" / ".z-image-turbo.partial").exists()
    fetched = {r.path for r in hub.body_requests()}
    assert fetched == pipeline_files(hub.repos[TURBO])
    assert (target / WEIGHTS).read_bytes() == hub.repos[TURBO].files[WEIGHTS]

    hub.reset()
    started = time.monotonic()
    again = run_download(hub.url, tmp_path, source)
    assert again.returncode == 0, again.stderr
    assert hub.requests == [] and "nothing to download" in again.stderr
    assert time.monotonic() - started < 10

    with serving(Settings(models_dir=tmp_path / "models", variant="turbo", device="cpu", store="none")) as client:
        response = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "seed": 1})
        assert response.status_code == 200, response.text[:300]
        assert response.json()["data"][0]["b64_json"]


@pytest.mark.parametrize("source", SOURCES)
def test_a_dropped_connection_resumes_from_where_it_broke(hub, tmp_path, source):
    hub.drop_once[WEIGHTS] = CUT_AT
    result = run_download(hub.url, tmp_path, source, "--model-id", "test/big")
    assert result.returncode == 0, result.stderr
    starts = [r.range_start for r in hub.body_requests() if r.path == WEIGHTS]
    assert starts[0] == 0 and len(starts) == 2 and 0 < starts[1] <= CUT_AT  # the retry asked for the rest only
    downloaded = tmp_path / "models" / "z-image-turbo" / WEIGHTS
    assert sha256(downloaded.read_bytes()) == sha256(hub.repos["test/big"].files[WEIGHTS])


@pytest.mark.parametrize("source", SOURCES)
def test_an_interrupted_download_continues_on_the_next_run(hub, tmp_path, source):
    hub.stall[WEIGHTS] = CUT_AT
    models = tmp_path / "models"
    staging = models / ".z-image-turbo.partial"
    command = cli("download", "--models-dir", str(models), "--source", source, "--model-id", "test/big")
    child = subprocess.Popen(command, env=hub_env(hub.url, tmp_path), stderr=subprocess.PIPE, text=True)
    try:
        assert hub.stalled.wait(30), "the download never reached the weights"
        others = pipeline_files(hub.repos["test/big"]) - {WEIGHTS}
        wait_for(lambda: all((staging / name).is_file() for name in others), 20, "the other files")
        wait_for(lambda: bytes_under(staging) > 10 * 2**20, 20, "the first 10 MB on disk")
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 130 and "rerun" in stderr.strip().splitlines()[-1]
    assert not (models / "z-image-turbo").exists() and staging.is_dir()

    hub.stall.clear()
    hub.release.set()
    with hub.lock:
        hub.requests.clear()
    result = run_download(hub.url, tmp_path, source, "--model-id", "test/big")
    assert result.returncode == 0, result.stderr
    body = hub.body_requests()
    assert [r.path for r in body] == [WEIGHTS]  # finished files are kept
    if source == "modelscope":
        assert body[0].range_start >= 2**20  # and the partial file continues
    else:
        # huggingface_hub 2.x resumes a file only within a run; a new run starts it again.
        assert body[0].range_start == 0
    downloaded = models / "z-image-turbo" / WEIGHTS
    assert sha256(downloaded.read_bytes()) == sha256(hub.repos["test/big"].files[WEIGHTS])
    assert model_files(models / "z-image-turbo") == pipeline_files(hub.repos["test/big"])


def test_a_second_download_into_the_same_folder_waits_for_the_first(hub, tmp_path):
    hold = hub.hold[WEIGHTS] = threading.Event()
    command = cli("download", "--models-dir", str(tmp_path / "models"))
    log = tmp_path / "second.log"
    first = subprocess.Popen(command, env=hub_env(hub.url, tmp_path), stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: WEIGHTS in {r.path for r in hub.body_requests()}, 30, "the first download")
        with log.open("w") as sink:
            second = subprocess.Popen(command, env=hub_env(hub.url, tmp_path), stderr=sink)
        wait_for(lambda: "waiting for it to finish" in log.read_text(), 30, "the second download to wait")
        hold.set()
        assert first.wait(30) == 0 and second.wait(30) == 0
    finally:
        first.kill()
    assert [r.path for r in hub.body_requests()].count(WEIGHTS) == 1


# -- failures: one line, non-zero exit, nothing where the server looks ----------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_unreachable_endpoint(tmp_path, source):
    result = run_download(f"http://127.0.0.1:{free_port()}", tmp_path, source)
    assert_one_line_failure(result, "cannot reach")
    assert not (tmp_path / "models" / "z-image-turbo").exists()


@pytest.mark.parametrize("source", SOURCES)
def test_unknown_repo(hub, tmp_path, source):
    result = run_download(hub.url, tmp_path, source, "--model-id", "nobody/nothing")
    assert_one_line_failure(result, "nobody/nothing", "not found")
    assert not (tmp_path / "models" / "z-image-turbo").exists()


@pytest.mark.parametrize(("source", "token_env"), [("huggingface", "HF_TOKEN"), ("modelscope", "MODELSCOPE_API_TOKEN")])
def test_auth_required(hub, tmp_path, source, token_env):
    result = run_download(hub.url, tmp_path, source, "--model-id", "test/gated")
    assert_one_line_failure(result, "test/gated", token_env)
    assert not (tmp_path / "models" / "z-image-turbo").exists()


@pytest.mark.parametrize("source", SOURCES)
def test_disk_space_refusal(hub, tmp_path, source):
    result = run_download(hub.url, tmp_path, source, "--model-id", "test/huge")
    assert_one_line_failure(result, "not enough disk space", "--models-dir")
    assert WEIGHTS not in {r.path for r in hub.body_requests()}
    assert not (tmp_path / "models" / "z-image-turbo").exists()


def test_a_repo_without_safetensors_weights_is_refused_before_fetching_them(hub, tmp_path):
    result = run_download(hub.url, tmp_path, "huggingface", "--model-id", "test/bin-only")
    assert_one_line_failure(result, "no safetensors weights for transformer")
    assert {r.path for r in hub.body_requests()} == {"model_index.json"}


def fetch_one_file(hub: FakeHub, tmp_path: Path, source: str, repo: str, name: str, folder: str, *args: str) -> Path:
    """Run a download that fetches `name` from `repo` into MODELS_DIR/<folder>; returns where it landed, checked."""
    result = run_download(hub.url, tmp_path, source, *args)
    assert result.returncode == 0, result.stderr
    landed = tmp_path / "models" / folder / name
    assert landed.read_bytes() == hub.repos[repo].files[name]
    return landed


@pytest.mark.parametrize("source", SOURCES)
def test_download_lora_fetches_one_file_into_the_lora_folder(hub, tmp_path, source):
    landed = fetch_one_file(hub, tmp_path, source, "test/lora", "pixel-art.safetensors", "loras", "--lora", "test/lora")
    assert {r.path for r in hub.body_requests()} == {"pixel-art.safetensors"}  # not the README
    assert sorted(p.name for p in landed.parent.iterdir()) == ["pixel-art.safetensors"]  # no staging left
    hub.reset()
    again = run_download(hub.url, tmp_path, source, "--lora", "test/lora")
    assert again.returncode == 0 and hub.body_requests() == [] and "nothing to download" in again.stderr

    picked = run_download(hub.url, tmp_path, source, "--lora", "test/loras", "--file", "b/c.safetensors")
    assert picked.returncode == 0, picked.stderr
    assert (tmp_path / "models" / "loras" / "c.safetensors").is_file()


@pytest.mark.parametrize("source", SOURCES)
def test_download_controlnet_fetches_the_named_file_into_the_controlnet_folder(hub, tmp_path, source):
    result = run_download(hub.url, tmp_path, source, "--controlnet", "test/loras:b/c.safetensors")
    assert result.returncode == 0, result.stderr
    landed = tmp_path / "models" / "controlnets" / "c.safetensors"
    assert landed.read_bytes() == hub.repos["test/loras"].files["b/c.safetensors"]
    assert {r.path for r in hub.body_requests()} == {"b/c.safetensors"}
    assert "Z_IMAGE_CONTROLNET=c.safetensors" in result.stderr
    assert_one_line_failure(run_download(hub.url, tmp_path, source, "--controlnet", "test/loras"), "REPO_ID:FILENAME")


@pytest.mark.parametrize("source", SOURCES)
def test_download_upscaler_fetches_the_named_file_into_the_upscaler_folder(hub, tmp_path, source):
    repo = "test/upscalers"
    fetch_one_file(hub, tmp_path, source, repo, "4x-Tiny.pth", "upscalers", "--upscaler", f"{repo}:4x-Tiny.pth")
    assert {r.path for r in hub.body_requests()} == {"4x-Tiny.pth"}
    hub.reset()
    elsewhere = tmp_path / "mine"
    result = run_download(
        hub.url, tmp_path, source, "--upscaler-dir", str(elsewhere), "--upscaler", f"{repo}:2x-Tiny.safetensors"
    )
    assert result.returncode == 0, result.stderr
    assert (elsewhere / "2x-Tiny.safetensors").read_bytes() == hub.repos[repo].files["2x-Tiny.safetensors"]
    assert "upscaler '2x-Tiny' is ready" in result.stderr
    assert_one_line_failure(run_download(hub.url, tmp_path, source, "--upscaler", repo), "REPO_ID:FILENAME")
    missing = run_download(hub.url, tmp_path, source, "--upscaler", f"{repo}:README.md")
    assert_one_line_failure(missing, "README.md", "--upscaler")
    broken = run_download(hub.url, tmp_path, source, "--upscaler", f"{repo}:broken.pth")
    assert broken.returncode == 4 and "not a readable safetensors or .pth file" in broken.stderr
    assert not (tmp_path / "models" / "upscalers" / "broken.pth").exists()


def test_download_lora_failures_are_one_line(hub, tmp_path):
    assert_one_line_failure(run_download(hub.url, tmp_path, "huggingface", "--lora", "test/loras"), "--file", "2")
    missing = run_download(hub.url, tmp_path, "huggingface", "--lora", "test/loras", "--file", "x.safetensors")
    assert_one_line_failure(missing, "x.safetensors")
    broken = run_download(hub.url, tmp_path, "huggingface", "--lora", "test/fake-lora")
    # Refused after the fetch, so the log's "downloading" line comes first; the error is still one line.
    assert broken.returncode == 4 and "Traceback" not in broken.stderr
    assert is_failure_line(broken.stderr.strip().splitlines()[-1]) and "not a readable" in broken.stderr
    assert_one_line_failure(run_download(hub.url, tmp_path, "modelscope", "--lora", "test/nope"), "test/nope")
    assert not (tmp_path / "models" / "loras" / "broken.safetensors").exists()


@pytest.mark.parametrize("source", SOURCES)
def test_download_transformer_fetches_the_file_and_the_folder_without_its_transformer_weights(hub, tmp_path, source):
    name = "z-image-turbo-Q8_0.gguf"
    fetch_one_file(hub, tmp_path, source, "test/gguf", name, "transformers", "--transformer", f"test/gguf:{name}")
    folder = tmp_path / "models" / "z-image-turbo"
    assert model_files(folder) == pipeline_files(hub.repos[TURBO]) - {WEIGHTS}
    assert WEIGHTS not in {r.path for r in hub.body_requests()}
    hub.reset()
    again = run_download(hub.url, tmp_path, source, "--transformer", f"test/gguf:{name}")
    assert again.returncode == 0 and hub.body_requests() == []


def test_download_transformer_failures_are_one_line(hub, tmp_path):
    assert_one_line_failure(run_download(hub.url, tmp_path, "huggingface", "--transformer", "test/gguf"), "REPO_ID:FILENAME")
    missing = run_download(hub.url, tmp_path, "huggingface", "--transformer", "test/gguf:other.gguf")
    assert_one_line_failure(missing, "other.gguf", "--transformer")
    assert not (tmp_path / "models" / "z-image-turbo").exists()


def test_edit_without_model_id_says_there_is_no_public_checkpoint(hub, tmp_path):
    result = run_download(hub.url, tmp_path, "huggingface", "--variant", "edit")
    assert_one_line_failure(result, "--model-id")
    assert hub.requests == []


# -- the server fetches what it lacks -------------------------------------------------------------


@contextlib.contextmanager
def serve_process(hub_url: str, tmp_path: Path, *flags: str, **env: str) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """`zimage-server serve` in a child process against the fake hub: (process, base URL, log file);
    stopped on the way out if it is still running."""
    port = free_port()
    log = tmp_path / "serve.log"
    environment = (
        hub_env(hub_url, tmp_path)
        | {"MODELS_DIR": str(tmp_path / "models"), "Z_IMAGE_DEVICE": "cpu", "Z_IMAGE_STORE": str(tmp_path / "outputs")}
        | env
    )
    with log.open("w") as sink:
        process = subprocess.Popen(cli("serve", "--port", str(port), *flags), env=environment, stdout=sink, stderr=sink)
    try:
        yield process, f"http://127.0.0.1:{port}", log
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def generate_small(base: str, **request: object) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/generations", json={"prompt": "a cat", "size": "64x64"}, **request)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_serve_fetches_a_missing_model_while_health_answers(hub, tmp_path):
    hold = hub.hold[WEIGHTS] = threading.Event()
    with serve_process(hub.url, tmp_path) as (_, base, log):
        wait_for(lambda: answers(f"{base}/health"), 60, "/health")
        assert httpx.get(f"{base}/ready").status_code == 503
        busy = generate_small(base)
        assert busy.status_code == 503 and busy.headers["retry-after"]
        assert busy.json()["error"]["code"] == "not_ready"
        hold.set()
        wait_for(lambda: answers(f"{base}/ready"), 60, "/ready")
        assert generate_small(base, timeout=30).status_code == 200
    assert model_files(tmp_path / "models" / "z-image-turbo") == pipeline_files(hub.repos[TURBO])
    assert "downloading Tongyi-MAI/Z-Image-Turbo" in log.read_text()


def test_serve_with_a_transformer_file_fetches_the_folder_without_its_transformer_weights(hub, tmp_path, models_dir):
    import torch
    from diffusers import ZImageTransformer2DModel

    from checkpoint_files import original_layout, write_safetensors

    tiny = ZImageTransformer2DModel.from_pretrained(models_dir / "z-image-turbo" / "transformer")
    (tmp_path / "models" / "transformers").mkdir(parents=True)
    write_safetensors(tmp_path / "models" / "transformers" / "t.safetensors", original_layout(tiny.state_dict()), torch.float32)
    with serve_process(hub.url, tmp_path, "--transformer", "t.safetensors") as (_, base, log):
        wait_for(lambda: answers(f"{base}/ready"), 120, "/ready")
        assert generate_small(base, timeout=30).status_code == 200
    assert model_files(tmp_path / "models" / "z-image-turbo") == pipeline_files(hub.repos[TURBO]) - {WEIGHTS}
    assert WEIGHTS not in {r.path for r in hub.body_requests()}, log.read_text()[-2000:]


def test_serve_stops_when_the_fetch_fails(tmp_path):
    with serve_process(f"http://127.0.0.1:{free_port()}", tmp_path) as (server, _, log):
        code = server.wait(60)
    assert code == 4, log.read_text()
    assert "cannot reach Hugging Face" in log.read_text()


@pytest.mark.parametrize(
    ("flags", "env"), [((), {"Z_IMAGE_OFFLINE": "1"}), ((), {"HF_HUB_OFFLINE": "1"}), (("--offline",), {})]
)
def test_serve_offline_with_no_model_prints_the_download_command(hub, tmp_path, flags, env):
    with serve_process(hub.url, tmp_path, *flags, **env) as (server, _, log):
        assert server.wait(60) == 3
    line = log.read_text().strip()
    assert "\n" not in line and "zimage-server download --variant turbo" in line
    assert hub.requests == []


def test_serve_never_fetches_into_an_existing_incomplete_folder(hub, tmp_path):
    (tmp_path / "models" / "z-image-turbo").mkdir(parents=True)
    with serve_process(hub.url, tmp_path) as (server, _, log):
        assert server.wait(60) == 3
    assert "model_index.json is missing" in log.read_text()
    assert hub.requests == []
