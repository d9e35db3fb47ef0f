from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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


def _reference(chunks: list[bytes]) -> list[str]:
    """The splitter as it was, line by line: the batched one must give the same lines."""
    out: list[str] = []
    buf = b""

    def emit(line: bytes) -> None:
        out.append((line[:-1] if line.endswith(b"\r") else line).decode("utf-8", errors="replace"))

    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            emit(line)
        while len(buf) > MAX_LINE:
            emit(buf[:MAX_LINE])
            buf = buf[MAX_LINE:]
    if buf:
        emit(buf)
    return out


@given(st.lists(st.binary(max_size=64) | st.sampled_from([b"\n", b"\r\n", b"\xe2\x82", b"\xac\n", b"\r"]), max_size=60))
def test_chunks_give_the_same_lines_in_batches_as_one_by_one(chunks: list[bytes]) -> None:
    # Multi-byte characters and CRs cut across chunks, invalid bytes, empty chunks: a job's output is
    # whatever it writes.
    batched: list[str] = []
    s = LineSplitter(emit_many=batched.extend)
    for c in chunks:
        s.feed(c)
    s.close()
    assert batched == _reference(chunks) == collect(chunks)
