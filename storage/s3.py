"""S3 backend (boto3): AWS S3, MinIO, SeaweedFS, R2 ... only the standard S3 API is assumed.

Endpoint, region and credentials come from the standard AWS settings (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE, instance roles), or from the
storage URL's query: s3://BUCKET/PREFIX?endpoint=URL&region=R&path_style=true|false&profile=NAME.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, urlsplit

from dstack.storage.base import ArtifactStore, UploadGrant, check_key
from dstack.storage.errors import (
    AccessDenied,
    NoSuchBucket,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
    from_http,
)
from dstack.storage.presign import Credentials, PathStylePresigner

# Objects above this size go up in parts; S3 needs parts of at least 5 MiB (except the last) and at
# most 10,000 parts, so the part size grows with the object.
MULTIPART_THRESHOLD = 64 << 20
PART_SIZE = 32 << 20
MAX_PARTS = 10_000
NO_CREDENTIALS = "no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"


def part_size_for(size: int) -> int:
    part = PART_SIZE
    while part * MAX_PARTS < size:
        part *= 2
    return part


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    endpoint: str | None = None
    region: str | None = None
    path_style: bool | None = None
    profile: str | None = None

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreError(f"storage URL {url!r}: expected s3://BUCKET/PREFIX")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint", "region", "path_style", "profile"}
        if unknown:
            raise StoreError(
                f"storage URL {url!r}: unknown option {sorted(unknown)[0]!r} (known: endpoint, region, path_style, "
                "profile)"
            )
        path_style = None
        if "path_style" in query:
            if query["path_style"].lower() not in ("true", "false", "1", "0"):
                raise StoreError(f"storage URL {url!r}: path_style must be true or false")
            path_style = query["path_style"].lower() in ("true", "1")
        prefix = parts.path.strip("/")
        return cls(parts.netloc, prefix, query.get("endpoint"), query.get("region"), path_style, query.get("profile"))


class _Body:
    """A streaming GET body as a closeable binary file."""

    def __init__(self, body: Any, what: str) -> None:
        self._body = body
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            return cast(bytes, self._body.read(None if n < 0 else n))
        except Exception as e:  # the connection broke or timed out mid-object: a new request may do
            raise StoreUnavailable(f"{self._what}: reading from the store failed: {e}") from e

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Store(ArtifactStore):
    presigns = True

    def __init__(self, location: S3Location) -> None:
        import boto3  # imported here: boto3 costs ~150 ms to import and only S3 users need it
        from botocore.config import Config

        self.loc = location
        self.bucket = location.bucket
        self.prefix = f"{location.prefix}/" if location.prefix else ""
        session = boto3.session.Session(profile_name=location.profile, region_name=location.region)
        client_kwargs: dict[str, Any] = {"endpoint_url": location.endpoint} if location.endpoint else {}
        probe = session.client("s3", **client_kwargs)  # resolves AWS_ENDPOINT_URL and profiles' endpoint_url
        endpoint = probe.meta.endpoint_url
        # Custom endpoints (MinIO, SeaweedFS ...) rarely have wildcard DNS for virtual-hosted buckets.
        path_style = location.path_style if location.path_style is not None else "amazonaws.com" not in endpoint
        config = Config(
            s3={"addressing_style": "path" if path_style else "auto"},
            signature_version="s3v4",
            max_pool_connections=64,
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        self.client = session.client("s3", config=config, **client_kwargs)
        self.endpoint = self.client.meta.endpoint_url
        self.presigner: PathStylePresigner | None = None
        if path_style:
            botocore_session = session._session  # the credential chain (refreshing role credentials too)

            def credentials() -> Credentials:
                c = botocore_session.get_credentials()
                if c is None:
                    raise AccessDenied(NO_CREDENTIALS)
                f = c.get_frozen_credentials()
                return Credentials(f.access_key, f.secret_key, f.token)

            self.presigner = PathStylePresigner(self.endpoint, self.client.meta.region_name or "us-east-1", credentials)
        self.description = f"s3://{self.bucket}/{location.prefix} at {self.endpoint}"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def collect_temporaries(self, older_than_s: float) -> int:
        """Multipart uploads under the prefix begun longer ago than `older_than_s` and never completed: their
        parts cost storage and never become an object (S3's lifecycle rule for this may not be set)."""
        cutoff = time.time() - older_than_s
        aborted = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for up in page.get("Uploads", []):
                    if up["Initiated"].timestamp() < cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                        aborted += 1
        except Exception as e:
            raise self._error("collect unfinished uploads", e) from e
        return aborted

    def _key_id(self) -> str:
        """The access key id in use (not secret), so that an AccessDenied says which credential."""
        try:
            creds = self.client._request_signer._credentials  # the credentials the client signs with
            return str(creds.access_key) if creds is not None else "none"
        except AttributeError:
            return "?"

    def _error(self, what: str, e: Exception) -> StoreError:
        """The StoreError subclass for a failed boto3 call (storage/errors.py)."""
        from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if isinstance(e, StoreError):
            return e
        if isinstance(e, NoCredentialsError):
            return AccessDenied(f"{what}: {NO_CREDENTIALS}")
        if isinstance(e, BotoConnectionError | HTTPClientError):  # refused, reset, timed out
            return StoreUnavailable(f"{what}: cannot reach the store at {self.endpoint} ({e})")
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchBucket" or (status == 404 and what.startswith("bucket")):
                return NoSuchBucket(f"{what}: bucket {self.bucket!r} does not exist at {self.endpoint}")
            if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied") or status == 403:
                return AccessDenied(
                    f"{what}: access denied by {self.endpoint} ({code or status}) to bucket {self.bucket!r} "
                    f"with access key {self._key_id()!r}: check the S3 credentials"
                )
            return from_http(status, code, str(err.get("Message", "")), what)
        inner = e.__cause__ or e.__context__
        if isinstance(inner, Exception):  # boto3's transfer manager wraps the ClientError (S3UploadFailedError)
            return self._error(what, inner)
        return StoreError(f"{what}: {e}")

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise self._error(f"bucket {self.bucket}", e) from e

    def put_stream(self, key: str, chunks: Iterator[bytes]) -> int:
        # Spooled to memory/disk first: a failed or cancelled stream must leave no object behind, and
        # upload_fileobj (boto3's transfer manager) then sends it in parallel parts if it is big.
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
            size = 0
            for chunk in chunks:
                spool.write(chunk)
                size += len(chunk)
            spool.seek(0)
            try:
                self.client.upload_fileobj(spool, self.bucket, self._key(key))
            except Exception as e:
                raise self._error(f"put {key}", e) from e
        return size

    def put_bytes(self, key: str, data: bytes) -> int:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as e:
            raise self._error(f"put {key}", e) from e
        return len(data)

    def copy(self, src: str, dst: str) -> None:
        """A copy inside the store (CopyObject, in parts when big): no byte passes through the coordinator."""
        from botocore.exceptions import ClientError

        try:
            self.client.copy({"Bucket": self.bucket, "Key": self._key(src)}, self.bucket, self._key(dst))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(src) from None
            raise self._error(f"copy {src}", e) from e
        except Exception as e:
            raise self._error(f"copy {src}", e) from e

    def open_read(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(key) from None
            raise self._error(f"get {key}", e) from e
        except Exception as e:
            raise self._error(f"get {key}", e) from e
        return cast(BinaryIO, _Body(resp["Body"], f"get {key}"))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._error(f"head {key}", e) from e
        except Exception as e:
            raise self._error(f"head {key}", e) from e

    def list_prefix(self, prefix: str) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + check_key(prefix.rstrip("/"))
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(self.prefix) :]] = obj["Size"]
        except Exception as e:
            raise self._error(f"list {prefix}", e) from e
        return out

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list_prefix(prefix))
        try:
            for i in range(0, len(keys), 1000):
                batch = [{"Key": self.prefix + k} for k in keys[i : i + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        except Exception as e:
            raise self._error(f"delete {prefix}", e) from e
        return len(keys)

    def presign_get(self, key: str, expires_s: int) -> str:
        if self.presigner is not None:
            return self.presigner.url("GET", self.bucket, self._key(key), expires_s)
        return cast(
            str,
            self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
            ),
        )

    def grant_upload(self, key: str, size: int, expires_s: int) -> UploadGrant:
        full = self._key(key)
        if size <= MULTIPART_THRESHOLD:
            if self.presigner is not None:
                return UploadGrant(key=key, url=self.presigner.url("PUT", self.bucket, full, expires_s))
            url = self.client.generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=expires_s
            )
            return UploadGrant(key=key, url=url)
        try:
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        except Exception as e:
            raise self._error(f"start upload of {key}", e) from e
        part = part_size_for(size)
        urls = tuple(
            self.presigner.url("PUT", self.bucket, full, expires_s, {"partNumber": str(n), "uploadId": upload_id})
            if self.presigner is not None
            else self.client.generate_presigned_url(
                "upload_part",
                Params={"Bucket": self.bucket, "Key": full, "UploadId": upload_id, "PartNumber": n},
                ExpiresIn=expires_s,
            )
            for n in range(1, max(1, -(-size // part)) + 1)
        )
        return UploadGrant(key=key, upload_id=upload_id, part_size=part, part_urls=urls)

    def complete_upload(self, key: str, upload_id: str, etags: Sequence[str]) -> None:
        parts = [{"PartNumber": n, "ETag": tag} for n, tag in enumerate(etags, 1)]
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except Exception as e:
            raise self._error(f"complete upload of {key}", e) from e

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
        except Exception:
            pass  # an unfinished upload is reclaimed by the bucket's lifecycle rules at worst
