from __future__ import annotations

import posixpath
import shlex
from urllib.parse import urlsplit

from dstack.cli import fields
from dstack.cli.errors import ProviderError
from dstack.cli.providers.base import Provider
from dstack.cli.spec import Workflow
from dstack.protos.v1 import common_pb2

CURL_IMAGE = "curlimages/curl:8.11.1"


class CurlProvider(Provider):
    """Downloads `url` into `output` (a file in the working directory), which is saved as an artifact."""

    name = "curl"
    schema = {
        "url": {"type": "string", "description": "http, https or ftp URL to download"},
        "output": {"type": "string", "description": "where to save it, relative to the working directory"},
    }
    required = ("url", "output")

    def _url(self, wf: Workflow) -> str:
        url = fields.string(wf.node, "url", required=True)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ftp") or not parts.netloc:
            raise ProviderError(f"url {url!r} must be an http, https or ftp URL", wf.node.at("url"))
        return url

    def _output(self, wf: Workflow) -> str:
        out = fields.relative_path(wf.node, "output", fields.string(wf.node, "output", required=True))
        if out == ".":
            raise ProviderError("output must name a file, e.g. data/file.tar.gz", wf.node.at("output"))
        # Artifact paths are relative to the code root; the commands run in working_dir.
        return posixpath.normpath(posixpath.join(wf.working_dir or ".", out))

    def commands(self, wf: Workflow) -> list[str]:
        url, out = shlex.quote(self._url(wf)), shlex.quote(self._output(wf))
        rel = shlex.quote(fields.relative_path(wf.node, "output", fields.string(wf.node, "output", required=True)))
        return [
            # dstack creates each artifact path as an empty folder before the job starts: here it is a file
            f"rmdir {rel} 2>/dev/null || true",
            f'mkdir -p "$(dirname {rel})"',
            "if command -v curl >/dev/null 2>&1; then",
            f"  curl -fsSL --retry 3 -o {rel} {url}",
            "elif command -v wget >/dev/null 2>&1; then",
            f"  wget -q -O {rel} {url}",
            "else",
            "  echo 'dstack: the curl provider needs curl or wget in the image' >&2; exit 127",
            "fi",
            f'echo "dstack: saved {url} to {out} ($(wc -c < {rel}) bytes)"',
        ]

    def image(self, wf: Workflow) -> str:
        return CURL_IMAGE

    def job_specs(self, wf: Workflow) -> list[common_pb2.JobSpec]:
        specs = super().job_specs(wf)
        out = self._output(wf)
        for spec in specs:
            if all(a.path != out for a in spec.artifacts):
                spec.artifacts.append(common_pb2.ArtifactSpec(path=out))
        return specs
