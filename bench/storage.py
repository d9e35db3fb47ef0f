"""Object-store throughput: our transfer engine vs s5cmd vs boto3's default upload_file/download_file,
on one SeaweedFS S3 server, in one run.

    python -m bench.storage [ROUNDS] [BIG_MIB] [SMALL_FILES]

Data sets: (a) one big file (default 1 GiB), (b) SMALL_FILES files of 64 KiB (default 2,000). Each
tool moves each set up and down ROUNDS times, interleaved so that noise hits them alike; medians are
printed as MB/s and files/s, with the ratio to s5cmd. "ours" is what the agents and the CLI run:
presigned URLs (presigning included in the time) through storage/transfer.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dstack.storage.devserver import SeaweedServer
from dstack.storage.s3 import S3Location, S3Store
from dstack.storage.transfer import Download, Transfer

S5CMD = str(Path(sys.executable).with_name("s5cmd"))


def make_data(root: Path, big_mib: int, small_files: int) -> tuple[Path, Path]:
    big = root / "big" / "big.bin"
    big.parent.mkdir(parents=True)
    with big.open("wb") as f:
        block = os.urandom(1 << 20)
        for i in range(big_mib):
            f.write(block[i % 7 :] + block[: i % 7])  # distinct blocks, cheap to make
    small = root / "small"
    small.mkdir()
    for i in range(small_files):
        (small / f"f{i:05d}").write_bytes(os.urandom(64 * 1024))
    return big, small


class Tools:
    def __init__(self, server: SeaweedServer, work: Path) -> None:
        os.environ.update(server.env())
        self.env = {**os.environ}
        self.server = server
        self.store = S3Store(S3Location.parse("s3://dstack/bench"))
        self.work = work
        import boto3

        self.boto = boto3.client("s3")

    def fresh(self, name: str) -> Path:
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    # -- ours ----------------------------------------------------------------------------------------
    def ours_up(self, files: list[Path], prefix: str) -> list[tuple[str, int, str]]:
        with Transfer() as t:
            grants = [self.store.grant_upload(f"{prefix}/{p.name}", p.stat().st_size, 3600) for p in files]
            done = t.put_many([(p, g, p.name) for p, g in zip(files, grants, strict=True)])
            for g, r in zip(grants, done, strict=True):
                if g.upload_id:
                    self.store.complete_upload(g.key, g.upload_id, r.etags)
        return [(f"{prefix}/{p.name}", r.size, r.sha256) for p, r in zip(files, done, strict=True)]

    def ours_down(self, manifest: list[tuple[str, int, str]], dest: Path) -> None:
        with Transfer() as t:
            items = [
                Download(self.store.presign_get(k, 3600), dest / k.rsplit("/", 1)[1], size, sha)
                for k, size, sha in manifest
            ]
            t.get_many(items)

    # -- s5cmd ---------------------------------------------------------------------------------------
    def s5(self, *args: str) -> None:
        cmd = [S5CMD, "--endpoint-url", self.server.endpoint, *args]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"s5cmd failed: {r.stderr[-2000:]}")

    def s5_up(self, src: Path, prefix: str, many: bool) -> None:
        self.s5("cp", f"{src}/*" if many else str(src), f"s3://dstack/bench/{prefix}/")

    def s5_down(self, prefix: str, dest: Path) -> None:
        self.s5("cp", f"s3://dstack/bench/{prefix}/*", f"{dest}/")

    def s5_down_verified(self, prefix: str, dest: Path) -> None:
        self.s5_down(prefix, dest)
        for p in dest.iterdir():
            with p.open("rb") as f:
                hashlib.file_digest(f, "sha256")

    # -- boto3 defaults ------------------------------------------------------------------------------
    def boto_up(self, files: list[Path], prefix: str) -> None:
        for p in files:
            self.boto.upload_file(str(p), "dstack", f"bench/{prefix}/{p.name}")

    def boto_down(self, files: list[Path], prefix: str, dest: Path) -> None:
        for p in files:
            self.boto.download_file("dstack", f"bench/{prefix}/{p.name}", str(dest / p.name))


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def one_round(
    tools: Tools, files: list[Path], folder: Path, many: bool, rnd: int
) -> list[tuple[tuple[str, str], float]]:
    """Each tool up, then each down; the order rotates by round so nobody gets a systematic edge."""
    tag = f"r{rnd}-{'many' if many else 'one'}"
    manifest: list[tuple[str, int, str]] = []
    ups: list[tuple[str, Callable[[], object]]] = [
        ("ours", lambda: manifest.extend(tools.ours_up(files, f"ours-{tag}"))),
        ("s5cmd", lambda: tools.s5_up(folder if many else files[0], f"s5-{tag}", many)),
        ("boto3", lambda: tools.boto_up(files, f"boto-{tag}")),
    ]
    # Every tool downloads the same objects (s5cmd's): how an object was uploaded (its part size)
    # changes how fast the server reads it back, and that must not count for or against a tool.
    downs: list[tuple[str, Callable[[], object]]] = [
        (
            "ours",
            lambda: tools.ours_down(
                [(f"s5-{tag}/{p.name}", size, sha) for p, (_, size, sha) in zip(files, manifest, strict=True)],
                tools.fresh("ours"),
            ),
        ),
        ("s5cmd", lambda: tools.s5_down(f"s5-{tag}", tools.fresh("s5"))),
        # s5cmd does not verify what it downloads; this is what it costs with the check we always do
        ("s5+sha", lambda: tools.s5_down_verified(f"s5-{tag}", tools.fresh("s5v"))),
        ("boto3", lambda: tools.boto_down(files, f"s5-{tag}", tools.fresh("boto"))),
    ]
    k = rnd % 3
    out = []
    for way, tools_fns in (("up", ups[k:] + ups[:k]), ("down", downs[k:] + downs[:k])):
        for tool, fn in tools_fns:
            # Each starts with clean page cache writeback: one tool's 1 GiB of dirty pages being
            # flushed must not throttle the next tool's writes.
            subprocess.run(["sync"], check=False)
            out.append(((tool, way), timed(fn)))
    return out


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    big_mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    small_n = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    work = Path(tempfile.mkdtemp(prefix="dstack-bench-s3-"))
    server = SeaweedServer(work / "weed")
    try:
        server.start()
        big, small = make_data(work / "data", big_mib, small_n)
        tools = Tools(server, work / "out")
        sets = {
            f"1 x {big_mib} MiB": ([big], big.parent, False),
            f"{small_n} x 64 KiB": (sorted(small.iterdir()), small, True),
        }
        results: dict[tuple[str, str, str], list[float]] = {}
        for rnd in range(rounds):
            for set_name, (files, folder, many) in sets.items():
                for key, secs in one_round(tools, files, folder, many, rnd):
                    results.setdefault((set_name, *key), []).append(secs)
            print(f"round {rnd + 1}/{rounds} done", file=sys.stderr)

        print(f"SeaweedFS on 127.0.0.1, {rounds} rounds, medians (each tool's own time, all in one run)")
        print(
            f"{'data set':<16} {'way':<5} {'tool':<6} {'seconds':>8} {'MB/s':>8} {'files/s':>8} {'vs s5cmd':>9}"
            "  every round (s)"
        )
        for set_name, (files, _, _) in sets.items():
            nbytes = sum(p.stat().st_size for p in files)
            for way in ("up", "down"):
                base = statistics.median(results[(set_name, "s5cmd", way)])
                for tool in ("ours", "s5cmd", "boto3", "s5+sha"):
                    if (set_name, tool, way) not in results:
                        continue
                    secs = statistics.median(results[(set_name, tool, way)])
                    print(
                        f"{set_name:<16} {way:<5} {tool:<6} {secs:8.2f} {nbytes / secs / 1e6:8.1f}"
                        f" {len(files) / secs:8.0f} {base / secs:8.2f}x  "
                        + " ".join(f"{x:.2f}" for x in results[(set_name, tool, way)])
                    )
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
