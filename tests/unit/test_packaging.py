"""An installed dstack adds exactly one top-level import name, `dstack`, to site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO


def test_a_built_wheel_installs_nothing_but_the_dstack_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, REPO],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("dstack-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        recorded = [line.split(",")[0] for line in z.read(record).decode().splitlines() if line]
        entry_points = z.read(record.replace("RECORD", "entry_points.txt")).decode()
    top_level = {path.split("/")[0] for path in recorded}
    assert top_level == {"dstack", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    # The parts of the checkout are all inside it, with the generated protocol code and the typing marker.
    for part in (
        "cli/main.py",
        "coordinator/engine.py",
        "agent/main.py",
        "storage/s3.py",
        "protos/v1/client_pb2.py",
        "api/client.py",
    ):
        assert f"dstack/{part}" in recorded
    assert "dstack/py.typed" in recorded
    # The web dashboard's files (coordinator/http/dashboard.py serves them; no build step, no CDN).
    for asset in ("index.html", "app.js", "app.css", "favicon.svg"):
        assert f"dstack/coordinator/http/static/{asset}" in recorded
    assert "dstack = dstack.cli.quick:main" in entry_points
    assert "bash = dstack.cli.providers.bash:BashProvider" in entry_points
