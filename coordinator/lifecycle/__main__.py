"""`python -m dstack.coordinator.lifecycle`: prints the transitions section of docs/lifecycle.md;
with `--write`, replaces it in the file (in a source checkout)."""

from __future__ import annotations

import sys

from dstack.coordinator.lifecycle import DOC, markdown, with_section


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        DOC.write_text(with_section(DOC.read_text()))
        return 0
    if argv:
        print("usage: python -m dstack.coordinator.lifecycle [--write]", file=sys.stderr)
        return 2
    print(markdown())
    return 0


sys.exit(main(sys.argv[1:]))
