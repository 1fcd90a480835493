"""Fetch Z-Image weights from Hugging Face or ModelScope into MODELS_DIR/z-image-<variant>.

The only module that talks to the hubs, and only through their client libraries: huggingface_hub's
`snapshot_download` and modelscope_hub's `download_repo` (the code behind modelscope's
`snapshot_download`). One download goes:

1. list the repo's files with their sizes: one metadata call, which also finds an unknown repo, a
   missing token or an unreachable endpoint before anything is written;
2. fetch model_index.json and pick the files of the components it names (configs, tokenizer files,
   safetensors weights); README images, fp16 copies and .bin duplicates stay on the hub;
3. compare what is left to fetch with the free disk space;
4. fetch into a staging folder beside the target (MODELS_DIR/.z-image-<variant>.partial), kept on
   failure so that the next run continues from it;
5. verify it with `verify_model_dir` and rename it into place: the folder the server loads only
   ever appears complete.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .logs import first_line, human_size, propagate_to_root
from .model_layout import (
    WEIGHTLESS,
    IncompleteModelError,
    is_gguf,
    is_safetensors,
    pipeline_components,
    verify_model_dir,
)
from .settings import Settings
from .variants import VARIANTS

log = logging.getLogger("zimage_server.download")

MODEL_INDEX = "model_index.json"
# The weights we load: safetensors files and indexes without a variant tag. fp16/bf16 copies carry
# the tag as one more dot-separated part (diffusion_pytorch_model.fp16.safetensors).
LOADED_WEIGHTS = re.compile(r"[^.]+\.safetensors(\.index\.json)?")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".onnx_data", ".gguf")
DOC_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".pdf")
# huggingface_hub 2.x restarts an interrupted file from byte 0 on the next run (it resumes only
# within a run), so a few files at a time bounds what an interruption costs to a few shards.
HF_MAX_WORKERS = 2
PROGRESS_LOG_EVERY_S = 10.0


class DownloadError(Exception):
    """A download that cannot go on; the message is one line that says what to do."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class RepoListing:
    repo_id: str
    revision: str  # what every fetch asks for: the commit on Hugging Face, the branch or tag on ModelScope
    files: dict[str, RemoteFile]


def repo_id_for(settings: Settings) -> str:
    if settings.model_id:
        return settings.model_id
    repo_id = VARIANTS[settings.variant].repo_id
    if repo_id is not None:
        return repo_id
    raise DownloadError(
        f"the {settings.variant} variant has no public checkpoint (Z-Image-Edit is announced, not published); "
        "pass --model-id (Z_IMAGE_MODEL_ID) naming a hub repo or a local folder that holds one"
    )


def staging_dir_for(target: Path) -> Path:
    return target.parent / f".{target.name}.partial"


def select_files(
    files: Iterable[RemoteFile], components: Iterable[str], weights_elsewhere: Collection[str] = ()
) -> list[RemoteFile]:
    """model_index.json and what the pipeline loads from the folders it names; nothing else.

    weights_elsewhere: components whose weights come from another file (`--transformer`): only
    their configs are fetched."""
    folders = tuple(f"{name}/" for name in components)
    skipped = tuple(f"{name}/" for name in weights_elsewhere)
    wanted = []
    for file in files:
        name = file.path.rsplit("/", 1)[-1]
        if file.path == MODEL_INDEX:
            wanted.append(file)
        elif not file.path.startswith(folders) or name.lower().endswith(DOC_SUFFIXES):
            continue
        elif name.endswith(WEIGHT_SUFFIXES) or ".index." in name:
            if LOADED_WEIGHTS.fullmatch(name) and not file.path.startswith(skipped):
                wanted.append(file)
        else:
            wanted.append(file)
    return sorted(wanted, key=lambda file: file.path)


def components_without_weights(
    wanted: list[RemoteFile], components: Iterable[str], weights_elsewhere: Collection[str] = ()
) -> list[str]:
    """Components that need weights but have no safetensors among the chosen files (a .bin-only repo)."""
    with_weights = {f.path.split("/", 1)[0] for f in wanted if LOADED_WEIGHTS.fullmatch(f.path.rsplit("/", 1)[-1])}
    needed = [name for name in components if name not in WEIGHTLESS and name not in weights_elsewhere]
    return [name for name in needed if name not in with_weights]


def bytes_under(folder: Path) -> int:
    """Bytes on disk below a folder, partial files included: what a download has received so far."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # a partial file renamed into place between listing and stat
    return total


def check_disk_space(files: list[RemoteFile], staging: Path) -> None:
    """Refuse to start what cannot fit: the files not yet complete in the staging folder against the free space."""

    def complete(file: RemoteFile) -> bool:
        local = staging / file.path
        return local.is_file() and local.stat().st_size == file.size

    needed = sum(f.size for f in files if not complete(f))
    free = shutil.disk_usage(staging).free
    if needed > free:
        raise DownloadError(
            f"not enough disk space: the model needs {human_size(needed)} more in {staging.parent} but only "
            f"{human_size(free)} is free; free some space or point --models-dir (MODELS_DIR) at a bigger disk"
        )


class ProgressLog:
    """Plain progress lines for logs, where bars would be noise: bytes received so far, every few seconds."""

    def __init__(self, label: str, folder: Path, total: int, every_s: float = PROGRESS_LOG_EVERY_S):
        self.label, self.folder, self.total, self.every_s = label, folder, total, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="download-progress", daemon=True)

    def run(self) -> None:
        last_bytes, last_time = bytes_under(self.folder), time.monotonic()
        while not self.stop.wait(self.every_s):
            now_bytes, now = bytes_under(self.folder), time.monotonic()
            rate = max(now_bytes - last_bytes, 0) / (now - last_time)
            share = min(now_bytes / self.total, 1.0) if self.total else 1.0
            log.info(
                "%s: %s of %s (%.0f%%), %s/s",
                self.label,
                human_size(now_bytes),
                human_size(self.total),
                100 * share,
                human_size(rate),
            )
            last_bytes, last_time = now_bytes, now

    def __enter__(self) -> ProgressLog:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it was raised from, so a wrapped network error is still recognised."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def root_cause(exc: BaseException) -> str:
    """The innermost reason, e.g. "[Errno 111] Connection refused" rather than three wrappers around it."""
    *_, innermost = causes(exc)
    return first_line(innermost)


class HuggingFaceHub:
    name = "Hugging Face"

    def __init__(self, progress_bars: bool) -> None:
        from huggingface_hub import HfApi, constants
        from huggingface_hub.utils import disable_progress_bars

        self.endpoint = constants.ENDPOINT  # HF_ENDPOINT, read by huggingface_hub when it is imported
        self.api = HfApi()
        if not progress_bars:
            disable_progress_bars()

    def list_files(self, repo_id: str, revision: str | None) -> RepoListing:
        info = self.api.model_info(repo_id, revision=revision, files_metadata=True)
        files = {
            s.rfilename: RemoteFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None)
            for s in info.siblings or []
        }
        return RepoListing(repo_id, info.sha or revision or "main", files)

    def fetch(self, listing: RepoListing, paths: list[str], local_dir: Path) -> None:
        from huggingface_hub import snapshot_download

        # Files interrupted in an earlier run are never reused (huggingface_hub gives each try its
        # own temporary name), so clear them rather than let them fill the disk.
        for orphan in (local_dir / ".cache").rglob("*.incomplete"):
            orphan.unlink(missing_ok=True)
        snapshot_download(
            listing.repo_id,
            revision=listing.revision,
            local_dir=local_dir,
            allow_patterns=[glob.escape(path) for path in paths],
            max_workers=HF_MAX_WORKERS,
        )

    def translate(self, exc: BaseException, repo_id: str, revision: str | None) -> DownloadError | None:
        import httpx2
        from huggingface_hub import errors

        for e in causes(exc):
            if isinstance(e, errors.GatedRepoError):
                return DownloadError(
                    f"{repo_id} on Hugging Face needs authorisation: accept its terms on the model page, "
                    "then set HF_TOKEN (or run `hf auth login`)"
                )
            if isinstance(e, errors.RevisionNotFoundError):
                return DownloadError(f"{repo_id} on Hugging Face has no revision {revision!r}; check --revision")
            if isinstance(e, errors.RepositoryNotFoundError):
                return DownloadError(
                    f"{repo_id} was not found on Hugging Face ({self.endpoint}); check --model-id, "
                    "or set HF_TOKEN if the repo is private"
                )
            if isinstance(e, errors.HfHubHTTPError) and e.response is not None:
                status = e.response.status_code
                if status in (401, 403):
                    return DownloadError(
                        f"Hugging Face refused access to {repo_id} (HTTP {status}); "
                        "set HF_TOKEN to a token that may read it"
                    )
                return DownloadError(
                    f"Hugging Face answered HTTP {status} for {repo_id}; retry later, or try --source modelscope"
                )
            if isinstance(e, httpx2.TransportError):
                return DownloadError(
                    f"cannot reach Hugging Face at {self.endpoint} ({root_cause(e)}); check the network "
                    "(or HF_ENDPOINT), or try --source modelscope; rerunning continues the download"
                )
        return None


class ModelScopeHub:
    name = "ModelScope"

    def __init__(self, progress_bars: bool) -> None:
        # modelscope_hub draws its bars with plain tqdm; the CLI turns them off with TQDM_DISABLE.
        from modelscope_hub import HubApi, get_default_config

        self.endpoint = get_default_config().endpoint  # MODELSCOPE_ENDPOINT, or modelscope.cn
        self.api = HubApi()

    def list_files(self, repo_id: str, revision: str | None) -> RepoListing:
        revision = revision or "master"
        entries = self.api.list_repo_files(repo_id, "model", revision=revision)
        files = {f.path: RemoteFile(f.path, f.size, f.sha256) for f in entries if not f.is_dir}
        return RepoListing(repo_id, revision, files)

    def fetch(self, listing: RepoListing, paths: list[str], local_dir: Path) -> None:
        # The listing we already have saves modelscope_hub from listing the repo again.
        file_list = [
            {"Path": f.path, "Size": f.size, "Sha256": f.sha256, "Type": "blob"} for f in listing.files.values()
        ]
        self.api.download_repo(
            listing.repo_id,
            "model",
            revision=listing.revision,
            local_dir=local_dir,
            allow_patterns=[glob.escape(path) for path in paths],
            file_list=file_list,
        )

    def translate(self, exc: BaseException, repo_id: str, revision: str | None) -> DownloadError | None:
        import requests
        from modelscope_hub import (
            AuthenticationError,
            FileDownloadError,
            FileIntegrityError,
            NetworkError,
            NotExistError,
            PermissionDeniedError,
            RequestTimeoutError,
            ServerError,
        )

        for e in causes(exc):
            if isinstance(e, FileDownloadError) and e.failed_files:
                failed_path, failure = next(iter(e.failed_files.items()))
                inner = self.translate(failure, repo_id, revision)
                reason = str(inner) if inner else f"{failed_path}: {first_line(failure)}; rerun to continue"
                return DownloadError(f"{len(e.failed_files)} file(s) failed: {reason}")
            if isinstance(e, NotExistError):
                return DownloadError(
                    f"{repo_id} (revision {revision or 'master'}) was not found on ModelScope ({self.endpoint}); "
                    "check --model-id and --revision"
                )
            if isinstance(e, (AuthenticationError, PermissionDeniedError)):
                return DownloadError(
                    f"ModelScope refused access to {repo_id}; set MODELSCOPE_API_TOKEN to a token that may read it"
                )
            if isinstance(e, FileIntegrityError):
                return DownloadError(f"a file of {repo_id} failed its integrity check ({first_line(e)}); rerun")
            if isinstance(e, (NetworkError, RequestTimeoutError, requests.ConnectionError, requests.Timeout)):
                return DownloadError(
                    f"cannot reach ModelScope at {self.endpoint} ({root_cause(e)}); check the network "
                    "(or MODELSCOPE_ENDPOINT), or try --source huggingface; rerunning continues the download"
                )
            if isinstance(e, ServerError):
                return DownloadError(f"ModelScope answered with a server error for {repo_id}; retry later")
        return None


HUBS = {"huggingface": HuggingFaceHub, "modelscope": ModelScopeHub}


def open_hub(source: str, progress_bars: bool) -> HuggingFaceHub | ModelScopeHub:
    hub = HUBS[source](progress_bars)
    propagate_to_root("huggingface_hub", "modelscope_hub")  # in our log format, not their own
    # The libraries log every retry and failure themselves; the caller reports a failure in one
    # line, so they speak only when asked for detail (--verbose).
    library_level = logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL
    for name in ("huggingface_hub", "modelscope_hub", "httpx2", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(library_level)
    return hub


@contextmanager
def errors_as_download_errors(hub: HuggingFaceHub | ModelScopeHub, repo_id: str, revision: str | None, staging: Path):
    try:
        yield
    except DownloadError:
        raise
    except Exception as exc:
        if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in causes(exc)):
            message = f"the disk filled up while downloading into {staging}; free some space and rerun to continue"
            raise DownloadError(message) from exc
        translated = hub.translate(exc, repo_id, revision)
        if translated is None:
            raise
        raise translated from exc


def already_complete(target: Path, weights_elsewhere: Collection[str] = ()) -> bool:
    """True for a verified model folder, False for none; a folder that fails verification is refused."""
    if not target.exists():
        return False
    try:
        verify_model_dir(target, weights_elsewhere)
    except IncompleteModelError as exc:
        message = f"{target} exists but is incomplete ({exc}); move it aside or delete it, then rerun"
        raise DownloadError(message) from None
    log.info("%s is complete; nothing to download", target)
    return True


@contextmanager
def exclusive_download(target: Path) -> Iterator[None]:
    """One download per target at a time (two pods on one volume, a second terminal): a later one waits."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another download into %s is running; waiting for it to finish", target)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fetch_pipeline(
    hub: HuggingFaceHub | ModelScopeHub,
    repo_id: str,
    revision: str | None,
    staging: Path,
    progress_bars: bool,
    weights_elsewhere: Collection[str] = (),
) -> None:
    """Fetch model_index.json, then the files of the components it names, into the staging folder."""
    listing = hub.list_files(repo_id, revision)
    if MODEL_INDEX not in listing.files:
        raise DownloadError(f"{repo_id} has no {MODEL_INDEX}, so it is not a diffusers pipeline; check --model-id")
    staging.mkdir(parents=True, exist_ok=True)
    hub.fetch(listing, [MODEL_INDEX], staging)
    try:
        components = pipeline_components(staging)
    except IncompleteModelError as exc:
        raise DownloadError(f"{repo_id}: {exc}") from None
    wanted = select_files(listing.files.values(), components, weights_elsewhere)
    unloadable = components_without_weights(wanted, components, weights_elsewhere)
    if unloadable:
        raise DownloadError(
            f"{repo_id} has no safetensors weights for {', '.join(unloadable)}, and safetensors is all the server loads"
        )
    check_disk_space(wanted, staging)
    total = sum(f.size for f in wanted)
    log.info(
        "downloading %s from %s (%s): %d files, %s, into %s",
        repo_id,
        hub.name,
        hub.endpoint,
        len(wanted),
        human_size(total),
        staging,
    )
    if progress_bars:
        hub.fetch(listing, [f.path for f in wanted], staging)
    else:
        with ProgressLog(f"downloading {repo_id}", staging, total):
            hub.fetch(listing, [f.path for f in wanted], staging)


def move_into_place(staging: Path, target: Path, weights_elsewhere: Collection[str] = ()) -> None:
    try:
        verify_model_dir(staging, weights_elsewhere)
    except IncompleteModelError as exc:
        raise DownloadError(f"the download ended incomplete ({exc}); rerun to fetch what is missing") from None
    # Hidden entries are the libraries' bookkeeping (resume metadata, locks), not part of the model.
    for entry in staging.iterdir():
        if entry.name.startswith("."):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    os.replace(staging, target)


def download_model(
    settings: Settings,
    *,
    revision: str | None = None,
    progress_bars: bool = False,
    weights_elsewhere: Collection[str] = (),
) -> Path:
    """Make settings.model_dir a complete model folder, downloading what it lacks; returns it.

    progress_bars: the libraries' bars (for a terminal); otherwise plain periodic log lines.
    weights_elsewhere: components whose weights are not fetched (the transformer, with `--transformer`).
    """
    target = settings.model_dir
    if already_complete(target, weights_elsewhere):
        return target
    repo_id = repo_id_for(settings)
    with exclusive_download(target):
        if already_complete(target, weights_elsewhere):  # the download we waited for
            return target
        hub = open_hub(settings.download_source, progress_bars)
        staging = staging_dir_for(target)
        started = time.monotonic()
        with errors_as_download_errors(hub, repo_id, revision, staging):
            fetch_pipeline(hub, repo_id, revision, staging, progress_bars, weights_elsewhere)
        move_into_place(staging, target, weights_elsewhere)
    log.info("downloaded %s in %.0f s: %s is ready", repo_id, time.monotonic() - started, target)
    return target


def is_torch_save(path: Path) -> bool:
    """What torch.save writes: a zip archive (torch >= 1.6), or a pickle stream (older files)."""
    try:
        with path.open("rb") as file:
            head = file.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


@dataclass(frozen=True)
class FileKind:
    """A kind of single weights file `download_file` fetches: what it is, how to recognise it, the
    flag naming it, the folder it goes to, and the log line once it is there."""

    what: str
    suffixes: tuple[str, ...]
    is_valid: Callable[[Path], bool]
    flag: str
    folder: Callable[[Settings], Path]
    ready: str  # formatted with the fetched file's Path as `path`


# By `zimage-server download` flag. Only the format is checked here (no torch): whether spandrel
# knows an upscaler's architecture, and that a .pth pickle imports nothing, is checked when the
# server reads it (upscalers.py).
FILE_KINDS = {
    "lora": FileKind(
        "safetensors", (".safetensors",), is_safetensors, "--file",
        lambda s: s.loras_dir, "downloaded {path}: LoRA {path.stem!r} is ready",
    ),
    "controlnet": FileKind(
        "safetensors", (".safetensors",), is_safetensors, "--controlnet REPO_ID:FILENAME",
        lambda s: Path(s.models_dir) / "controlnets", "downloaded {path}: serve it with Z_IMAGE_CONTROLNET={path.name}",
    ),
    "upscaler": FileKind(
        "safetensors or .pth", (".safetensors", ".pth"),
        lambda p: is_safetensors(p) if p.suffix == ".safetensors" else is_torch_save(p), "--upscaler REPO_ID:FILENAME",
        lambda s: s.upscalers_dir, "downloaded {path}: upscaler {path.stem!r} is ready",
    ),
    "transformer": FileKind(
        "safetensors or GGUF", (".safetensors", ".gguf"), lambda p: is_safetensors(p) or is_gguf(p),
        "--transformer REPO_ID:FILENAME",
        lambda s: s.transformers_dir, "downloaded {path}: serve it with Z_IMAGE_TRANSFORMER={path.name}",
    ),
}  # fmt: skip


def download_file(
    settings: Settings, kind: str, repo_id: str, filename: str | None = None, *,
    revision: str | None = None, progress_bars: bool = False,
) -> Path:
    """Fetch one weights file of a kind in `FILE_KINDS` from a hub repo into its folder; returns
    where it landed.

    filename: the file in the repo; without it, the repo's only file of this kind. It is fetched
    into a hidden staging folder beside its destination, checked to be a file of its kind, and only
    then moved to FOLDER/<its name>, so a half-fetched file is never loaded.
    """
    kind = FILE_KINDS[kind]
    folder = kind.folder(settings)
    hub = open_hub(settings.download_source, progress_bars)
    staging = folder / f".{repo_id.replace('/', '--')}.partial"
    with errors_as_download_errors(hub, repo_id, revision, staging):
        listing = hub.list_files(repo_id, revision)
        candidates = [f for f in listing.files.values() if f.path.endswith(kind.suffixes)]
        if filename is not None:
            candidates = [f for f in candidates if f.path == filename]
            if not candidates:
                raise DownloadError(f"{repo_id} has no {kind.what} file {filename!r}; check {kind.flag}")
        elif len(candidates) != 1:
            shown = ", ".join(f.path for f in candidates[:5]) or "none"
            raise DownloadError(f"{repo_id} holds {len(candidates)} {kind.what} files ({shown}); name one with {kind.flag}")
        (remote,) = candidates
        target = folder / Path(remote.path).name
        if target.is_file() and target.stat().st_size == remote.size:
            log.info("%s is already in %s: nothing to download", remote.path, folder)
            log.info(kind.ready.format(path=target))
            return target
        staging.mkdir(parents=True, exist_ok=True)
        check_disk_space([remote], staging)
        log.info("downloading %s from %s %s (%s) into %s", remote.path, hub.name, repo_id, human_size(remote.size), folder)
        hub.fetch(listing, [remote.path], staging)
    fetched = staging / remote.path
    if not kind.is_valid(fetched):
        raise DownloadError(f"{repo_id}/{remote.path} is not a readable {kind.what} file; the server loads only those")
    os.replace(fetched, target)
    shutil.rmtree(staging, ignore_errors=True)
    log.info(kind.ready.format(path=target))
    return target


async def fetch_in_subprocess(settings: Settings) -> None:
    """Fetch-on-start: run `zimage-server download` for these settings in a child process.

    A child, not a thread: a download cannot be stopped mid-file inside this process (the hub
    libraries' worker threads are joined at exit), while a child stops at once when the server does
    and the next start continues from its staging folder.
    """
    command = [sys.executable, "-m", "zimage_server.cli", "download", "--variant", settings.variant]
    command += ["--models-dir", str(settings.models_dir), "--source", settings.download_source]
    if settings.model_id:
        command += ["--model-id", settings.model_id]
    if settings.transformer is not None:
        command.append("--without-transformer-weights")  # the transformer comes from its own file
    log.info("no model at %s: downloading it first; /ready answers 503 until it is loaded", settings.model_dir)
    child = await asyncio.create_subprocess_exec(*command)
    try:
        code = await child.wait()
    finally:
        if child.returncode is None:
            child.terminate()
            await child.wait()
    if code != 0:
        raise DownloadError(f"the model download failed (`zimage-server download` exited with {code})")
