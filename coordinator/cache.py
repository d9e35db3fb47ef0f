"""The step cache's keys (docs/reproducibility.md, "Step cache"): what makes two jobs the same step.

A job's key is computed by the coordinator alone, from what it stores and hands the agent, never from
anything a client claims: a client that wants a hit has to send the same code tree, the same job spec
and get the same inputs, and then the job would produce the same thing anyway. Two halves:

- the base, known at submission: the run's repository, the packed code tree's sha256 (the whole shipped
  tree), the job spec as the provider made it (variables, overrides and `${{ }}` resolved; `${{ run.name }}`
  still unexpanded, so the run's name is not in it; the `cache` flag itself cleared, so `cache: true`
  and `--reuse` give one key), and an HMAC of the secrets the job would get, under a key derived from
  the coordinator's secrets key: jobs hit only where those values are the same, and no value is stored;
- the inputs, known when the job may start: the manifest hash of each job whose artifacts it takes
  (jobs of its run it depends on, runs its tags and workflow dependencies resolved to).

The image enters by its reference as written (or the provider's choice; "" is the agent's default): the
digest a mutable tag resolves to is known only on the agent that pulls it, so a tag that moved still
hits. `dstack show` says which reference the key used; pin a digest (`image: name@sha256:...`) to make
the key exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from typing import Any

from dstack.coordinator.model import ArtifactInput, JobSpec
from dstack.coordinator.records import manifest_hash
from dstack.protos.v1 import common_pb2

KEY_VERSION = "dstack.step-key/v1"
CACHE_PART = "cache"  # the job's part of the run's record that says how the cache treated it


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def secrets_digest(key: bytes, secrets: Mapping[str, str]) -> str:
    """An HMAC of the secrets' names and values: equal only for equal values, and useless without the
    coordinator's key (a leaked database does not let anyone test guesses of a value)."""
    return hmac.new(key, json.dumps(sorted(secrets.items())).encode(), hashlib.sha256).hexdigest()


def spec_digest(encoded: bytes) -> str:
    spec = common_pb2.JobSpec.FromString(encoded)
    spec.cache = False
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()


def base_key(repository: str, code_hash: str, encoded_spec: bytes, secrets: str) -> str:
    return _digest(
        {
            "v": KEY_VERSION,
            "repository": repository,
            "code": code_hash,
            "spec": spec_digest(encoded_spec),
            "secrets": secrets,
        }
    )


def input_manifests(inputs: Sequence[ArtifactInput]) -> list[list[str]]:
    """(job name, manifest hash) of each input, sorted: not the runs' names, which differ between two runs
    that hold the same files."""
    return sorted([i.job_name, manifest_hash([(f.path, f.size, f.sha256) for f in i.files])] for i in inputs)


def full_key(base: str, inputs: Sequence[ArtifactInput]) -> str:
    return _digest({"v": KEY_VERSION, "base": base, "inputs": input_manifests(inputs)})


def without_cache(spec: JobSpec) -> JobSpec:
    """The spec with its `cache` flag off (`dstack rerun` runs a run's jobs again: a hit would hand back the
    old run's own files). Its key is the same: the flag is not in it."""
    if not spec.cache:
        return spec
    proto = common_pb2.JobSpec.FromString(spec.encoded)
    proto.cache = False
    return dataclasses.replace(spec, encoded=proto.SerializeToString(), cache=False)


def image_of(encoded_spec: bytes) -> dict[str, Any]:
    """How the key names the job's image (see the module's note)."""
    image = common_pb2.JobSpec.FromString(encoded_spec).image
    return {"image": image or "(the agent's default)", "image_by_digest": "@sha256:" in image}
