"""Packs the working tree into a reproducible tarball, named by its sha256.

In a git repository: tracked files plus untracked files that are not ignored; outside git: every
file. The same tree always gives the same bytes (sorted entries, zeroed times and owners), so
unchanged code has the same hash and is not sent again.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from cli.errors import CliError
from protos.v1 import common_pb2

SKIP_DIRS = {".git", "__pycache__", ".venv", ".dstack-venv", "node_modules"}


@dataclass
class PackedCode:
    data: bytes
    ref: common_pb2.CodeRef
    files: int


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return out.decode("utf-8", errors="replace")


def list_files(root: Path, exclude: tuple[Path, ...] = ()) -> tuple[list[str], common_pb2.CodeRef]:
    """The files to pack, relative to root; outside git, folders in `exclude` are left out."""
    ref = common_pb2.CodeRef()
    listed = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listed is not None:
        names = [n for n in listed.split("\0") if n]
        ref.commit = (_git(root, "rev-parse", "HEAD") or "").strip()
        ref.branch = (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
        ref.repo_url = (_git(root, "config", "--get", "remote.origin.url") or "").strip()
        ref.dirty = bool((_git(root, "status", "--porcelain") or "").strip())
    else:
        names = []
        skip = {p.resolve() for p in exclude}
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and (Path(dirpath) / d).resolve() not in skip)
            rel = Path(dirpath).relative_to(root)
            names.extend((rel / f).as_posix() for f in files)
    # Deleted-but-tracked files are listed by git; keep only what exists.
    return sorted(n for n in set(names) if os.path.lexists(root / n)), ref


def pack(root: Path, exclude: tuple[Path, ...] = ()) -> PackedCode:
    names, ref = list_files(root, exclude)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in names:
                path = root / name
                st = path.lstat()
                info = tarfile.TarInfo(name)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if stat.S_ISLNK(st.st_mode):
                    info.type = tarfile.SYMTYPE
                    info.linkname = os.readlink(path)
                    info.mode = 0o777
                    tar.addfile(info)
                elif stat.S_ISREG(st.st_mode):
                    info.size = st.st_size
                    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                    try:
                        with path.open("rb") as f:
                            tar.addfile(info, f)
                    except OSError as e:
                        raise CliError(f"cannot read {path}: {e.strerror}") from None
    data = buf.getvalue()
    ref.hash = hashlib.sha256(data).hexdigest()
    ref.size = len(data)
    return PackedCode(data=data, ref=ref, files=len(names))
