"""Stage a run's data shards under the artifact root, content-addressed, so every host can read them.

The tokenizer stage resolves its shards into a machine-local cache (`data.cache_dir`, e.g.
~/.cache/flaxchat/data: the generated demo corpus, downloaded ClimbMix shards). A manifest naming
those paths is useless to a step on another machine or to a `resume` elsewhere. So the stage copies
each local shard to

    <artifact_root>/data/sha256/<sha256 of the file>.parquet

and its manifest names only those URIs. Because the name is the content's hash:
* runs share the copies: a second run (any flow, any run id) finds the object already there and
  uploads nothing (the hash of a cached shard is itself cached, see `_digest`);
* a staged object is never rewritten in place, so a manifest's URI always means the same bytes;
* an upload is checked before it counts: the stored object's size, and the md5 GCS computes on its
  side (when the backend reports one), must match the local file.
Uploads are single objects that appear only when complete, so a half-uploaded shard never exists
under its final name; two runs staging the same shard at once write identical bytes.

Only a REMOTE artifact root is staged to by the tokenizer stage. With a local root the manifest keeps
naming the local files where they are: the run is on one machine (or on a cache directory every host
mounts), where those paths are as readable as any copy, and standalone stage runs default to a
relative ./artifacts that should not fill up with data. `stage_shards` itself also takes a local root
(hard links, no bytes copied; a copy across filesystems) for users who want one self-contained tree.

Shards that already live in an object store (`data.source: gs://…`) are read where they are: every
host can reach them, and copying a user's dataset into the artifact bucket would double its cost.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from typing import Any, Sequence

from flaxchat import storage
from flaxchat.data import DataError

log = logging.getLogger(__name__)
STAGE_DIR = ("data", "sha256")
_CHUNK = 1 << 20


def staged_uri(artifact_root: str, sha256: str) -> str:
    return storage.join(artifact_root, *STAGE_DIR, f"{sha256}.parquet")


def _hash_file(path: str) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), base64.b64encode(md5.digest()).decode("ascii")


def _digest(path: str) -> dict[str, Any]:
    """{"sha256", "md5", "bytes"} of a local file. Cached in a hidden sidecar file keyed by size and
    mtime, so a rerun over 170 ClimbMix shards does not re-read 17 GB; a read-only source directory
    just goes without the cache."""
    st = os.stat(path)
    sidecar = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.sha256.json")
    key = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        with open(sidecar) as fh:
            cached = json.load(fh)
        if {k: cached.get(k) for k in key} == key and cached.get("sha256") and cached.get("md5"):
            return {"sha256": cached["sha256"], "md5": cached["md5"], "bytes": st.st_size}
    except (OSError, ValueError):
        pass
    sha, md5 = _hash_file(path)
    try:
        storage.write_text(sidecar, json.dumps({**key, "sha256": sha, "md5": md5}))
    except OSError:
        pass
    return {"sha256": sha, "md5": md5, "bytes": st.st_size}


def _check_copy(uri: str, digest: dict[str, Any], source: str) -> None:
    """The stored object must have the local file's size and, where the backend reports its own
    md5 (GCS does for uploaded objects), the same md5."""
    meta = storage.info(uri)
    md5 = meta.get("md5Hash")
    if int(meta.get("size", -1)) != digest["bytes"] or (md5 and md5 != digest["md5"]):
        storage.remove_tree(uri)
        raise DataError(f"staging {source} to {uri}: the stored copy does not match the local file "
                        f"({meta.get('size')} bytes, md5 {md5}; expected {digest['bytes']} bytes, md5 "
                        f"{digest['md5']}); check the bucket and rerun")


def stage_shard(path: str, artifact_root: str) -> dict[str, Any]:
    """Make one local shard available at its content address; returns its manifest entry."""
    digest = _digest(path)
    uri = staged_uri(artifact_root, digest["sha256"])
    entry = {"uri": uri, "name": os.path.basename(path), "sha256": digest["sha256"], "bytes": digest["bytes"]}
    if not storage.is_remote(uri) and os.path.abspath(path) == os.path.abspath(uri):
        return {**entry, "uploaded": False}   # staged shards given back as the source: already there
    if storage.exists(uri):
        if storage.size(uri) == digest["bytes"]:
            return {**entry, "uploaded": False}
        # a different size under a content address: not written by us (uploads are atomic); replace it
        log.warning("staged shard %s has the wrong size; staging it again", uri)
    storage.put_file(path, uri, link=True)
    _check_copy(uri, digest, path)
    return {**entry, "uploaded": True}


def stage_shards(shards: Sequence[str], artifact_root: str) -> list[dict[str, Any]]:
    """Stage every local shard under `artifact_root` (order kept: the last is validation). Shards
    already in an object store are kept where they are (entry without sha256). Returns one entry
    per shard: {"uri", "name", "sha256", "bytes", "uploaded"}."""
    entries = []
    for shard in shards:
        shard = str(shard)
        if storage.is_remote(shard):
            entries.append({"uri": shard, "name": storage.basename(shard)})
            continue
        if not os.path.isfile(shard):
            raise DataError(f"shard {shard!r} not found while staging it under {artifact_root}; "
                            f"rerun so the shard list is resolved again")
        entries.append(stage_shard(shard, artifact_root))
    staged = [e for e in entries if "sha256" in e]
    if staged:
        up = sum(e["uploaded"] for e in staged)
        log.info("data staged under %s: %d shard(s) uploaded, %d already there",
                 storage.join(artifact_root, *STAGE_DIR), up, len(staged) - up)
    return entries


def verify_staged(entries: Sequence[dict[str, Any]]) -> None:
    """Re-read every staged shard and check its sha256 (a full read: for audits and tests, not for
    every training start)."""
    for e in entries:
        if "sha256" in e and storage.sha256_file(e["uri"]) != e["sha256"]:
            raise DataError(f"staged shard {e['uri']} does not match its sha256 {e['sha256'][:12]}…; "
                            f"delete it and rerun the tokenizer stage")
