"""Hostile code archives: each attack is refused with a message naming the member, and nothing is
written outside the job folder (a sentinel folder beside it stays as it was)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dstack.agent import unpack
from dstack.agent.unpack import UnpackError, extract
from dstack.cli.packing import pack

Member = tuple[tarfile.TarInfo, bytes | None]


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info, None


def _dir(name: str) -> Member:
    return _special(name, tarfile.DIRTYPE)


def _symlink(name: str, target: str) -> Member:
    return _special(name, tarfile.SYMTYPE, target)


def _archive(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _cve_2025_4517(sentinel_rel: str) -> list[Member]:
    """The shape of the public proof of concept: folders with 247-character names, each reachable through
    a one-letter symlink, so that the path through the symlinks is short but the resolved one is longer
    than PATH_MAX (os.path.realpath stops resolving it there, and tarfile's `data` filter, which relies on
    it, believes a link that climbs back out of the tree stays inside); then a link through that chain
    that escapes, and a file written through it."""
    comp = "d" * 247
    steps = "abcdefghijklmnop"
    members: list[Member] = []
    path = ""
    for s in steps:
        members.append(_dir(os.path.join(path, comp)))
        members.append(_symlink(os.path.join(path, s), comp))
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(_symlink(linkpath, "../" * len(steps)))  # back to the top, through the symlinks
    members.append(_symlink("escape", linkpath + "/../" + sentinel_rel))
    members.append(_file("escape/pwned", b"owned"))
    return members


@pytest.fixture
def place(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(job folder, sentinel folder beside it); after the test the sentinel holds only what it held."""
    job, sentinel = tmp_path / "job", tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret").write_text("secret")
    yield job, sentinel
    assert sorted(p.name for p in sentinel.iterdir()) == ["secret"]
    assert (sentinel / "secret").read_text() == "secret"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "job", "sentinel"]


ATTACKS: dict[str, tuple[Callable[[], list[Member]], str]] = {
    "dotdot": (lambda: [_file("../sentinel/pwned")], "member '../sentinel/pwned' escapes the job folder"),
    "dotdot-inner": (lambda: [_file("a/../../sentinel/pwned")], "escapes the job folder"),
    "absolute": (lambda: [_file("/tmp/pwned")], "member '/tmp/pwned' is an absolute path"),
    "symlink-out-then-file": (
        lambda: [_symlink("out", "../sentinel"), _file("out/pwned")],
        "symlink 'out' -> '../sentinel' points outside the job folder",
    ),
    "absolute-symlink": (lambda: [_symlink("out", "/etc")], "points outside the job folder"),
    "file-through-inside-symlink": (
        lambda: [_dir("sub"), _symlink("in", "sub"), _file("in/pwned")],
        "member 'in/pwned' goes through 'in', which is not a folder",
    ),
    "dotdot-after-symlink": (
        lambda: [_symlink("here", "."), _symlink("out", "here/../sentinel")],
        "has '..' after a name",
    ),
    "hardlink-out": (
        lambda: [_special("hl", tarfile.LNKTYPE, "../sentinel/secret")],
        "member 'hl' is a hard link",
    ),
    "chardev": (lambda: [_special("null", tarfile.CHRTYPE)], "member 'null' is a character device"),
    "blockdev": (lambda: [_special("sda", tarfile.BLKTYPE)], "member 'sda' is a block device"),
    "fifo": (lambda: [_special("pipe", tarfile.FIFOTYPE)], "member 'pipe' is a fifo"),
    "cve-2025-4517": (lambda: _cve_2025_4517("sentinel"), "not a folder"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_archives_are_refused(attack: str, place: tuple[Path, Path], tmp_path: Path) -> None:
    job, _ = place
    build, message = ATTACKS[attack]
    archive = _archive(tmp_path / "a.tar.gz", build())
    with pytest.raises(UnpackError, match=r"^code archive: ") as e:
        extract(archive, job)
    assert message in str(e.value)


def test_the_cve_chain_passes_a_text_check_but_resolves_outside(tmp_path: Path) -> None:
    """The chain is the real thing: where a later member does go through a symlink, its own check is what
    refuses it (the `escape` link alone, with '..' after a name)."""
    members = _cve_2025_4517("sentinel")
    escape = next(m for m, _ in members if m.name == "escape")
    assert not os.path.normpath(escape.linkname).startswith("..")  # as text, it stays inside
    with pytest.raises(UnpackError, match=r"has '\.\.' after a name"):
        unpack.check_link_target(escape.name, [], escape.linkname)
    assert len(os.path.join(*(["d" * 247] * 16), "l" * 254)) > os.pathconf("/", "PC_PATH_MAX")


def test_too_many_members(place: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job, _ = place
    monkeypatch.setattr(unpack, "MAX_MEMBERS", 50)  # the real limit, met the same way, only smaller
    archive = _archive(tmp_path / "a.tar.gz", [_file(f"f{i}") for i in range(51)])
    with pytest.raises(UnpackError, match=r"more than 50 members \(at 'f50'\)"):
        extract(archive, job)


def test_file_and_total_size_limits(place: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job, _ = place
    monkeypatch.setattr(unpack, "MAX_FILE_BYTES", 10)
    archive = _archive(tmp_path / "a.tar.gz", [_file("big", b"x" * 11)])
    with pytest.raises(UnpackError, match="member 'big' is 11 bytes, over the 10-byte limit"):
        extract(archive, job)
    monkeypatch.setattr(unpack, "MAX_TOTAL_BYTES", 15)
    archive = _archive(tmp_path / "a.tar.gz", [_file("one", b"x" * 8), _file("two", b"x" * 8)])
    with pytest.raises(UnpackError, match="over 15 bytes unpacked \\(at member 'two'\\)"):
        extract(archive, job)


def test_what_the_cli_packs_unpacks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "lib").mkdir(parents=True)
    (src / "main.py").write_text("print('hi')\n")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "pkg" / "lib" / "x.py").write_text("x = 1\n")
    (src / "pkg" / "up").symlink_to("../main.py")
    (src / "pkg" / "lib" / "near").symlink_to("x.py")
    archive = tmp_path / "code.tar.gz"
    archive.write_bytes(pack(src).data)
    job = tmp_path / "job"
    for _ in range(2):  # unpacking again over the same folder replaces what is there
        extract(archive, job)
    assert (job / "main.py").read_text() == "print('hi')\n"
    assert os.readlink(job / "pkg" / "up") == "../main.py"
    assert (job / "pkg" / "up").read_text() == "print('hi')\n"
    assert (job / "pkg" / "lib" / "near").read_text() == "x = 1\n"
    assert stat.S_IMODE((job / "run.sh").stat().st_mode) & 0o111


def test_modes_are_masked(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "a.tar.gz", [_file("suid", b"#!/bin/sh\n", 0o6777), _file("plain", b"", 0o666)])
    extract(archive, tmp_path / "job")
    assert stat.S_IMODE((tmp_path / "job" / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "job" / "plain").stat().st_mode) == 0o644
