"""Prints how long the workflow loader takes to refuse each hostile YAML document (tests/unit/test_yaml_bounds.py
and tests/corpus/9[3-5]_*.yaml assert the errors; the timings live here, not in tests).

    python -m bench.yaml_bounds
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from dstack.cli import yamlsrc
from dstack.cli.errors import WorkflowError
from tests.unit.test_yaml_bounds import HOSTILE

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "corpus"


def timed(path: Path) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        yamlsrc.load(path)
        outcome = "loaded"
    except WorkflowError as e:
        outcome = str(e).split(": ", 1)[-1][:60]
    return time.perf_counter() - start, outcome


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(name, make()) for name, (make, _) in sorted(HOSTILE.items())]
        paths = []
        for name, text in cases:
            p = Path(tmp) / f"{name}.yaml"
            p.write_text(text)
            paths.append(p)
        paths += sorted(CORPUS.glob("9[3-5]_*.yaml"))
        print(f"{'document':<28} {'bytes':>9} {'seconds':>8}  outcome")
        for p in paths:
            seconds, outcome = timed(p)
            print(f"{p.stem:<28} {p.stat().st_size:>9} {seconds:>8.3f}  {outcome}")


if __name__ == "__main__":
    main()
