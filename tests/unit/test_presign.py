"""Our path-style SigV4 presigner signs exactly what botocore signs (it only skips botocore's pipeline)."""

from __future__ import annotations

import datetime
from urllib.parse import parse_qsl, urlsplit

import pytest

from dstack.storage.presign import Credentials, PathStylePresigner

KEY = "runs/r-1/job/artifacts/dir with space/ü+x=y&z.txt"


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:18333", "https://minio.example.com", "http://h:9000/sub"])
@pytest.mark.parametrize("token", [None, "tok/en+="])
@pytest.mark.parametrize(
    ("operation", "method", "params", "query"),
    [
        ("get_object", "GET", {}, {}),
        ("put_object", "PUT", {}, {}),
        ("upload_part", "PUT", {"UploadId": "abc/+=d", "PartNumber": 3}, {"uploadId": "abc/+=d", "partNumber": "3"}),
    ],
)
def test_same_signature_as_botocore(
    endpoint: str, token: str | None, operation: str, method: str, params: dict[str, object], query: dict[str, str]
) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="AKID",
        aws_secret_access_key="se/cr+et",
        aws_session_token=token,
        region_name="eu-west-1",
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )
    theirs = client.generate_presigned_url(operation, Params={"Bucket": "dstack", "Key": KEY, **params}, ExpiresIn=600)
    when = dict(parse_qsl(urlsplit(theirs).query))["X-Amz-Date"]
    now = datetime.datetime.strptime(when, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    ours = PathStylePresigner(endpoint, "eu-west-1", lambda: Credentials("AKID", "se/cr+et", token)).url(
        method, "dstack", KEY, 600, query, now
    )
    a, b = urlsplit(theirs), urlsplit(ours)
    assert (a.scheme, a.netloc, a.path) == (b.scheme, b.netloc, b.path)
    assert dict(parse_qsl(a.query)) == dict(parse_qsl(b.query))  # signature included
