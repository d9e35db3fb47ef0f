from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from dstack.agent.masking import Masker


def test_value_base64_and_lines_are_masked() -> None:
    m = Masker(["s3cr3t-token", "line-one\nline-two", "abc"])
    assert m.mask("token=s3cr3t-token!") == "token=***!"
    assert m.mask(base64.b64encode(b"s3cr3t-token").decode()) == "***"
    assert m.mask("got line-two here") == "got *** here"
    assert m.mask("abc is too short to mask") == "abc is too short to mask"


def test_no_secrets_no_change() -> None:
    assert Masker([]).mask("anything") == "anything"


@given(
    st.text(min_size=4, max_size=40).filter(lambda s: not {"\n", "\r", "*"} & set(s)),
    st.text(max_size=20),
)
def test_a_value_never_survives_masking(secret: str, around: str) -> None:
    assert secret not in Masker([secret]).mask(around + secret + around)


@given(
    st.lists(st.text(alphabet="ab\nc", min_size=1, max_size=8), min_size=1, max_size=3),
    st.lists(st.text(alphabet="abc*", max_size=12), min_size=1, max_size=6),
)
def test_a_block_of_lines_is_masked_as_each_line_alone(secrets: list[str], lines: list[str]) -> None:
    # The agent masks a read's lines joined by "\n" (one call per block): a secret with a newline must not
    # match across two lines where line-by-line masking would not.
    m = Masker(secrets)
    assert m.mask_lines("\n".join(lines)) == "\n".join(m.mask(line) for line in lines)
