"""A Docker engine of the tests' own, and the images they use, built locally (no registry is reachable).

`dockerd` runs with its own data root, exec root and socket, and with no bridge, iptables or IP
forwarding, so it leaves no network changes behind. Images:

- `dstack-test/busybox:1`: Debian's static busybox plus its applet links (bash jobs, docker provider);
- `dstack-test/busybox-cmd:1`: the same with a default command (the docker provider without commands);
- `dstack-test/python:3.11`: `debootstrap --variant=minbase --include=python3-minimal bookworm`, built
  once per machine (about 40 s) and cached as a tarball under ~/.cache/dstack-test-images.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

IMAGES_VERSION = "1"
BUSYBOX = f"dstack-test/busybox:{IMAGES_VERSION}"
BUSYBOX_CMD = f"dstack-test/busybox-cmd:{IMAGES_VERSION}"
PYTHON = "dstack-test/python:3.11"
CACHE = Path(os.environ.get("DSTACK_TEST_IMAGE_CACHE", "~/.cache/dstack-test-images")).expanduser()


class DockerUnavailable(Exception):
    pass


@contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # parallel test sessions build each image once
        yield


def busybox_tar() -> Path:
    out = CACHE / f"busybox-{IMAGES_VERSION}.tar"
    with _cache_lock():
        if out.exists():
            return out
        busybox = shutil.which("busybox")
        if busybox is None:
            raise DockerUnavailable("busybox is not installed (apt-get install busybox-static)")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
        tmp = out.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tar:
            for d in ("bin", "tmp", "etc", "root"):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
                tar.addfile(info)
            tar.add(busybox, "bin/busybox")
            for name in applets:
                if name != "busybox":
                    link = tarfile.TarInfo(f"bin/{name}")
                    link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                    tar.addfile(link)
            passwd = b"root:x:0:0:root:/root:/bin/sh\n"
            info = tarfile.TarInfo("etc/passwd")
            info.size = len(passwd)
            tar.addfile(info, io.BytesIO(passwd))
        tmp.rename(out)
    return out


def python_tar() -> Path:
    return debootstrap_tar(f"python-3.11-bookworm-{IMAGES_VERSION}", "python3-minimal")


def debootstrap_tar(name: str, include: str) -> Path:
    """A Debian bookworm root file system with `include` (debootstrap --include), as CACHE/NAME.tar.gz, built
    once per machine: no registry is needed to import it as an image."""
    out = CACHE / f"{name}.tar.gz"
    with _cache_lock():
        if out.exists():
            return out
        if shutil.which("debootstrap") is None:
            raise DockerUnavailable("debootstrap is not installed (apt-get install debootstrap)")
        root = Path(tempfile.mkdtemp(prefix=f"dstack-{name}-"))
        try:
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={include}", "bookworm", str(root)],
                check=True,
                capture_output=True,
            )
            for junk in ("var/cache/apt/archives", "usr/share/doc", "usr/share/man", "usr/share/locale"):
                shutil.rmtree(root / junk, ignore_errors=True)
            tmp = out.with_suffix(".tmp")
            subprocess.run(["tar", "-C", str(root), "-czf", str(tmp), "."], check=True)
            tmp.rename(out)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


@dataclass
class Dockerd:
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    _client: docker.DockerClient | None = None

    @property
    def sock(self) -> Path:
        return self.root / "d.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def start(self, timeout: float = 30) -> None:
        if shutil.which("dockerd") is None:
            raise DockerUnavailable("dockerd is not installed (apt-get install docker.io)")
        if os.geteuid() != 0:
            raise DockerUnavailable("the tests' own dockerd needs root")
        log = open(self.root / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            [
                "dockerd",
                "--data-root",
                str(self.root / "data"),
                "--exec-root",
                str(self.root / "exec"),
                "-H",
                self.host,
                "--pidfile",
                str(self.root / "dockerd.pid"),
                "--iptables=false",
                "--ip-forward=false",
                "--bridge=none",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().ping()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise DockerUnavailable(f"dockerd did not start; see {self.root / 'dockerd.log'}") from None
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def remove(self) -> list[Path]:
        """Stops the engine and removes its folder, with what it left mounted in it (its `netns/default`, which
        dockerd does not unmount itself); returns what is still mounted there: nothing, since a busy mount is
        detached (umount --lazy)."""
        from tests.cleanup import unmount_under

        self.stop()
        left = unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        return left

    def client(self) -> docker.DockerClient:
        """One client for the engine's life (made once it answers: the SDK asks for its version)."""
        if self._client is None:
            import docker

            self._client = docker.DockerClient(base_url=self.host, timeout=30)
        return self._client

    def containers(self, agent_home: Path | str) -> list[Container]:
        """Containers (also stopped ones) that an agent with this home created. One removed while it is listed
        (the agent may be removing it right now) is left out, not an error."""
        found = self.client().containers.list(
            all=True, ignore_removed=True, filters={"label": f"dstack.agent-home={agent_home}"}
        )
        return list(found)

    def load_images(self, python: bool = False) -> None:
        c = self.client()
        have = {t for img in c.images.list() for t in img.tags}
        if BUSYBOX not in have or BUSYBOX_CMD not in have:
            tar = busybox_tar()
            c.api.import_image_from_file(str(tar), repository=BUSYBOX.split(":")[0], tag=IMAGES_VERSION)
            c.api.import_image_from_file(
                str(tar),
                repository=BUSYBOX_CMD.split(":")[0],
                tag=IMAGES_VERSION,
                changes=['CMD ["sh", "-c", "echo default command of the image"]'],
            )
        if python and PYTHON not in have:
            repo, tag = PYTHON.split(":")
            c.api.import_image_from_file(str(python_tar()), repository=repo, tag=tag)
