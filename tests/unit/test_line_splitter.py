from __future__ import annotations

from dstack.agent.runner import MAX_LINE, LineSplitter, describe_exit


def collect(chunks: list[bytes]) -> list[str]:
    out: list[str] = []
    s = LineSplitter(out.append)
    for c in chunks:
        s.feed(c)
    s.close()
    return out


def test_lines_split_across_chunks() -> None:
    assert collect([b"ab", b"c\nde", b"f\n", b"tail"]) == ["abc", "def", "tail"]


def test_crlf_and_invalid_utf8() -> None:
    assert collect([b"win\r\n", b"\xff\xfebad\n"]) == ["win", "\ufffd\ufffdbad"]


def test_huge_line_is_split_not_buffered_forever() -> None:
    lines = collect([b"x" * (MAX_LINE * 2 + 10), b"\n"])
    assert [len(x) for x in lines] == [MAX_LINE, MAX_LINE, 10]


def test_exit_descriptions() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "killed by signal SIGKILL"
