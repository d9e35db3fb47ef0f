"""Unpacking an uploaded code archive into a job's folder, member by member, without trusting
`tarfile`'s extraction filters (CVE-2025-4517 bypasses the `data` filter with a PATH_MAX symlink chain).

Every write goes through folder descriptors: each path component is opened with
O_DIRECTORY|O_NOFOLLOW relative to its parent's descriptor, files are created with
O_CREAT|O_EXCL|O_NOFOLLOW, so nothing the archive creates (a symlink) is ever followed while it is
unpacked. Only folders, regular files and symlinks whose target stays inside the tree (what
cli/packing.py produces) are accepted.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from pathlib import Path

# Far above a real project (the CLI packs source code, not data sets), far below what fills a disk:
MAX_MEMBERS = 100_000  # entries in one archive (tarfile keeps each one's header in memory)
MAX_FILE_BYTES = 2 << 30  # one file, unpacked
MAX_TOTAL_BYTES = 8 << 30  # all files together, unpacked (a gzip bomb stops here)
CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnpackError(Exception):
    """A code archive that was refused: the message names the member and why."""


def _parts(name: str) -> list[str]:
    """The member's path components, refusing absolute names, `..` and empty names."""
    if "\0" in name:
        raise UnpackError(f"code archive: member {name!r} has a NUL in its name")
    if name.startswith("/") or name.startswith("\\"):
        raise UnpackError(f"code archive: member {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnpackError(f"code archive: member {name!r} escapes the job folder")
    if not parts:
        raise UnpackError(f"code archive: member {name!r} has no name")
    return parts


def check_link_target(name: str, parent: list[str], target: str) -> None:
    """A symlink may only point inside the tree: relative, its `..` components only at the start and no
    more of them than its folder is deep. A `..` after a name is refused outright, because the kernel
    resolves it after that name (which may itself be a symlink: `x/..` is not always the folder holding
    x; that is how CVE-2025-4517 escapes a check that normalizes the text)."""
    if not target or "\0" in target:
        raise UnpackError(f"code archive: symlink {name!r} has an empty target")
    if target.startswith("/"):
        raise UnpackError(f"code archive: symlink {name!r} -> {target!r} points outside the job folder")
    ups, seen_name = 0, False
    for p in target.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if seen_name:
                raise UnpackError(
                    f"code archive: symlink {name!r} -> {target!r} has '..' after a name (it may resolve outside)"
                )
            ups += 1
        else:
            seen_name = True
    if ups > len(parent):
        raise UnpackError(f"code archive: symlink {name!r} -> {target!r} points outside the job folder")


def _open_dir(parent_fd: int, part: str, member: str, create: bool) -> int:
    if create:
        try:
            os.mkdir(part, 0o755, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnpackError(f"code archive: member {member!r} goes through {part!r}, which is not a folder") from None
        raise


def _walk(root_fd: int, parts: list[str], member: str) -> int:
    """A descriptor of the folder parts[:-1] names (created as needed), never following a symlink."""
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            nxt = _open_dir(fd, part, member, create=True)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _clear(dir_fd: int, leaf: str, member: str) -> None:
    """Removes a file or symlink already at `leaf` (an archive unpacked again); a folder is an error."""
    try:
        st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise UnpackError(f"code archive: member {member!r} would replace a folder")
    os.unlink(leaf, dir_fd=dir_fd)  # unlink removes a symlink itself, never its target


def _write_file(tar: tarfile.TarFile, m: tarfile.TarInfo, dir_fd: int, leaf: str) -> None:
    mode = 0o755 if m.mode & 0o111 else 0o644  # no setuid, setgid or sticky bits; no group/other write
    try:
        fd = os.open(leaf, _FILE_FLAGS, mode, dir_fd=dir_fd)
    except FileExistsError:
        _clear(dir_fd, leaf, m.name)
        fd = os.open(leaf, _FILE_FLAGS, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; it never adds any
        src = tar.extractfile(m)
        if src is None:
            raise UnpackError(f"code archive: member {m.name!r} has no data")
        with src:
            written = 0
            while data := src.read(CHUNK):
                written += len(data)
                if written > m.size:  # the header said less: never trust the data to stop on its own
                    raise UnpackError(f"code archive: member {m.name!r} is longer than its header says")
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def extract(archive: Path, dest: Path) -> None:
    """Unpacks a gzipped tar into dest (blocking: run it in a thread). Raises UnpackError, naming the
    member, for anything that could write outside dest or is not a folder, file or inside symlink."""
    dest.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(dest, _DIR_FLAGS)
    members = total = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            while (m := tar.next()) is not None:
                members += 1
                if members > MAX_MEMBERS:
                    raise UnpackError(f"code archive: more than {MAX_MEMBERS} members (at {m.name!r})")
                parts = _parts(m.name)
                if m.isdir():
                    fd = _walk(root_fd, [*parts, ""], m.name)
                    os.close(fd)
                elif m.issym():
                    check_link_target(m.name, parts[:-1], m.linkname)
                    fd = _walk(root_fd, parts, m.name)
                    try:
                        _clear(fd, parts[-1], m.name)
                        os.symlink(m.linkname, parts[-1], dir_fd=fd)
                    finally:
                        os.close(fd)
                elif m.isreg() and not m.issparse():
                    if m.size > MAX_FILE_BYTES:
                        raise UnpackError(
                            f"code archive: member {m.name!r} is {m.size} bytes, over the {MAX_FILE_BYTES}-byte limit"
                        )
                    total += m.size
                    if total > MAX_TOTAL_BYTES:
                        raise UnpackError(f"code archive: over {MAX_TOTAL_BYTES} bytes unpacked (at member {m.name!r})")
                    fd = _walk(root_fd, parts, m.name)
                    try:
                        _write_file(tar, m, fd, parts[-1])
                    finally:
                        os.close(fd)
                elif m.islnk():
                    raise UnpackError(f"code archive: member {m.name!r} is a hard link (not supported)")
                else:
                    raise UnpackError(
                        f"code archive: member {m.name!r} is a {_kind(m)}: only folders, files and symlinks"
                    )
    except tarfile.TarError as e:
        raise UnpackError(f"code archive: unreadable: {e}") from None
    finally:
        os.close(root_fd)


def _kind(m: tarfile.TarInfo) -> str:
    if m.ischr():
        return "character device"
    if m.isblk():
        return "block device"
    if m.isfifo():
        return "fifo"
    if m.issparse():
        return "sparse file"
    return f"member of type {m.type!r}"
