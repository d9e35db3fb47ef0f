"""Storage URLs: what a user types after --storage / DSTACK_STORAGE."""

from __future__ import annotations

import pytest

from dstack.storage import StoreError


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("s3://", "expected s3://BUCKET/PREFIX"),
        ("s3://b/p?path_style=maybe", "path_style must be true or false"),
        ("s3://b/p?endpont=http://x", "unknown option 'endpont'"),
    ],
)
def test_bad_s3_urls_say_what_is_wrong(url: str, needle: str) -> None:
    from dstack.storage.s3 import S3Location

    with pytest.raises(StoreError, match=needle):
        S3Location.parse(url)


def test_s3_url_options() -> None:
    from dstack.storage.s3 import S3Location, part_size_for

    loc = S3Location.parse("s3://bucket/a/b/?endpoint=http://h:9000&region=eu&path_style=false&profile=p")
    assert (loc.bucket, loc.prefix, loc.endpoint, loc.region, loc.path_style, loc.profile) == (
        "bucket",
        "a/b",
        "http://h:9000",
        "eu",
        False,
        "p",
    )
    assert part_size_for(1 << 30) == 32 << 20
    assert part_size_for(10 << 40) * 10_000 >= 10 << 40  # 10 TiB still fits in 10,000 parts
