"""Download pretraining shards of the named Hugging Face datasets, robustly.

Which files (all have one `text` column; the last file in each plan is the validation split):
* climbmix    -> karpathy/climbmix-400b-shuffle, `shard_{i:05d}.parquet`, i < 6542 for train and
                 shard_06542 pinned as validation (as nanochat's dataset.py does).
* fineweb-edu -> karpathy/fineweb-edu-100b-shuffle, same naming, last shard 01822 (nanochat's
                 dataset before its March 2026 switch to ClimbMix).
* tinystories -> roneneldan/TinyStories, the repo's own parquet files: data/train-0000{0..3}-of-00004-
                 <hash>.parquet (4 train files) and data/validation-00000-of-00001-<hash>.parquet.
                 The hashed names are fixed in the dataset repo (unchanged since 2023); if HF renames
                 them the error names the URL, and a local directory source is the fallback.

Robustness: per-request (connect and read) timeouts; retries with exponential backoff on
connection errors, timeouts, HTTP 5xx/408/429 and truncated bodies; a 4xx is reported at once.
Each file streams to a hidden temp file in the target directory and is renamed into place only
once it is complete and its parquet footer reads back, so a half file is never named like a
shard and a rerun resumes by skipping shards that are present and readable.

The base URL https://huggingface.co can be replaced with FLAXCHAT_HF_ENDPOINT (tests point it at
a local server); HF_TOKEN, when set, is sent as a bearer token (higher rate limits).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from flaxchat.data import DownloadError

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
_CHUNK = 1 << 20
_RETRYABLE_STATUS = {408, 429}
_MAX_BACKOFF_S = 60.0
_DATA_HINT = "check data.source/data.num_shards (and FLAXCHAT_HF_ENDPOINT or HF_TOKEN if set)"


@dataclass(frozen=True)
class RemoteSource:
    name: str
    repo: str                                        # HF dataset repo id
    plan: Callable[[int], list[tuple[str, str]]]     # num_shards -> [(path in repo, local file name)]


def _numbered_plan(last_shard: int) -> Callable[[int], list[tuple[str, str]]]:
    """First num_shards-1 shards for training plus the pinned last shard for validation."""
    def plan(num_shards: int) -> list[tuple[str, str]]:
        ids = list(range(min(num_shards - 1, last_shard))) + [last_shard]
        return [(f"shard_{i:05d}.parquet", f"shard_{i:05d}.parquet") for i in ids]
    return plan


_TINYSTORIES_TRAIN = (
    "data/train-00000-of-00004-2d5a1467fff1081b.parquet",
    "data/train-00001-of-00004-5852b56a2bd28fd9.parquet",
    "data/train-00002-of-00004-a26307300439e943.parquet",
    "data/train-00003-of-00004-d243063613e5a057.parquet",
)
_TINYSTORIES_VAL = "data/validation-00000-of-00001-869c898b519ad725.parquet"


def _tinystories_plan(num_shards: int) -> list[tuple[str, str]]:
    # local names drop the content hash and sort train-* before validation-*
    files = list(_TINYSTORIES_TRAIN[:max(1, min(num_shards - 1, len(_TINYSTORIES_TRAIN)))]) + [_TINYSTORIES_VAL]
    return [(f, os.path.basename(f).rsplit("-", 1)[0] + ".parquet") for f in files]


REMOTE_SOURCES: dict[str, RemoteSource] = {
    "climbmix": RemoteSource("climbmix", "karpathy/climbmix-400b-shuffle", _numbered_plan(6542)),
    "fineweb-edu": RemoteSource("fineweb-edu", "karpathy/fineweb-edu-100b-shuffle", _numbered_plan(1822)),
    "tinystories": RemoteSource("tinystories", "roneneldan/TinyStories", _tinystories_plan),
}


def hf_endpoint() -> str:
    return (os.environ.get("FLAXCHAT_HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def shard_urls(source: str, num_shards: int) -> list[tuple[str, str]]:
    """[(url, local file name)] for the first `num_shards` shards of a named source (val last)."""
    if source not in REMOTE_SOURCES:
        raise DownloadError(f"unknown remote data source {source!r}; choose one of {', '.join(REMOTE_SOURCES)}")
    if num_shards < 2:
        raise DownloadError(
            f"data.num_shards={num_shards} for {source!r}: need at least 2 (train + the validation shard)")
    src = REMOTE_SOURCES[source]
    base = f"{hf_endpoint()}/datasets/{src.repo}/resolve/main"
    return [(f"{base}/{path}", name) for path, name in src.plan(num_shards)]


def is_valid_parquet(path: str) -> bool:
    """True when the file exists and its parquet footer (schema + row groups) reads back."""
    import pyarrow.parquet as pq
    try:
        pq.read_metadata(path)
        return True
    except Exception:  # missing, truncated, not parquet: all mean "fetch it again"
        return False


class _Retryable(Exception):
    pass


def _fetch_once(session, url: str, tmp: str, timeout_s: float, validate: Callable[[str], bool] = None,
                what: str = "a readable parquet file", hint: str = _DATA_HINT) -> None:
    import requests
    headers = {}
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    try:
        with session.get(url, stream=True, timeout=(timeout_s, timeout_s), headers=headers) as resp:
            if resp.status_code >= 500 or resp.status_code in _RETRYABLE_STATUS:
                raise _Retryable(f"HTTP {resp.status_code}")
            if resp.status_code >= 400:
                raise DownloadError(f"download failed: HTTP {resp.status_code} for {url}; {hint}")
            expected = resp.headers.get("Content-Length")
            written = 0
            with open(tmp, "wb") as f:
                for chunk in resp.iter_content(chunk_size=_CHUNK):
                    f.write(chunk)
                    written += len(chunk)
            if expected is not None and resp.headers.get("Content-Encoding") in (None, "identity") \
                    and written != int(expected):
                raise _Retryable(f"truncated body: {written} of {expected} bytes")
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
        raise _Retryable(f"{type(e).__name__}: {e}") from e
    if not (validate or is_valid_parquet)(tmp):
        raise _Retryable(f"the body is not {what}")


def download_file(url: str, dest: str, timeout_s: float = 60.0, retries: int = 5,
                  backoff_s: float = 1.0, session=None, *, validate: Callable[[str], bool] | None = None,
                  what: str = "a readable parquet file", hint: str = _DATA_HINT) -> str:
    """Fetch `url` to `dest` atomically. `retries` = extra attempts after the first; the wait
    before retry k is backoff_s * 2**k (capped at 60 s, with a little jitter). The body must pass
    `validate` (default: a readable parquet file; `what` names it in errors, `hint` says what to
    check after an HTTP 4xx)."""
    import requests
    session = session or requests.Session()
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(dest)),
                       f".{os.path.basename(dest)}.part-{uuid.uuid4().hex[:12]}")
    attempts = max(0, int(retries)) + 1
    last = ""
    for attempt in range(attempts):
        try:
            _fetch_once(session, url, tmp, timeout_s, validate, what, hint)
            os.replace(tmp, dest)
            return dest
        except _Retryable as e:
            last = str(e)
            log.warning("attempt %d/%d for %s failed: %s", attempt + 1, attempts, url, last)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if attempt + 1 < attempts:
            time.sleep(min(_MAX_BACKOFF_S, backoff_s * 2 ** attempt) * (1 + 0.1 * random.random()))
    raise DownloadError(
        f"could not download {url} after {attempts} attempts (last error: {last}); check the network "
        f"or FLAXCHAT_HF_ENDPOINT and rerun (finished shards are kept)")


def download_shards(source: str, num_shards: int, cache_dir: str, timeout_s: float = 60.0,
                    retries: int = 5, backoff_s: float = 1.0, workers: int = 4) -> list[str]:
    """Make the first `num_shards` shards of a named source present in `cache_dir` and return
    their paths (validation shard last). Shards already present and readable are skipped."""
    import requests
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(cache_dir, exist_ok=True)
    plan = [(url, os.path.join(cache_dir, name)) for url, name in shard_urls(source, num_shards)]
    todo = [(url, path) for url, path in plan if not is_valid_parquet(path)]
    if todo:
        log.info("downloading %d of %d %s shards into %s", len(todo), len(plan), source, cache_dir)
        local = threading.local()  # one Session (connection pool) per worker thread

        def one(job: tuple[str, str]) -> BaseException | None:
            if not hasattr(local, "session"):
                local.session = requests.Session()
            try:
                download_file(job[0], job[1], timeout_s, retries, backoff_s, local.session)
                return None
            except DownloadError as e:
                return e

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            errors = [e for e in pool.map(one, todo) if e is not None]
        if errors:
            more = f" ({len(errors) - 1} more shards also failed)" if len(errors) > 1 else ""
            raise DownloadError(f"{errors[0]}{more}")
    return [path for _, path in plan]
