"""Load Hugging Face datasets as rows without the `datasets` library.

Every public dataset on the Hub has an automatic parquet export on the `refs/convert/parquet`
branch, laid out as `{config}/{split}/0000.parquet, 0001.parquet, ...`. We fetch those files
over plain HTTP (flaxchat.data.download.download_file: timeouts, retries, temp file + rename,
parquet validation), numbering upwards until the first HTTP 404, and read them with pyarrow.
The endpoint comes from flaxchat.data.download.hf_endpoint(), so FLAXCHAT_HF_ENDPOINT redirects
everything (the tests serve files from a loopback server).

(The Hub converts at most ~5 GB of a split, under `partial-{split}/`; every dataset used here is
far smaller, so the full `{split}/` directory is the one to read.)

Cache layout: `{cache_dir}/{owner}--{name}/{config}/{split}/NNNN.parquet` plus `manifest.json`,
written last (atomically), listing the files. Once the manifest is there and its files read back,
no request is made at all (the probe for "is there one more file?" is what the manifest saves).
An exclusive fcntl lock on a `.lock` file in that directory makes concurrent processes on one
host (e.g. one per accelerator) wait for a single download instead of racing on the same file.

Rows are served lazily (`ParquetRows`) because SmolTalk's train split is ~460K conversations and
turning all of them into Python dicts up front would cost gigabytes; `hf_parquet_rows` is the
eager list form for small splits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Iterator

from flaxchat.data import DownloadError
from flaxchat.tasks.base import Task, TaskError

DEFAULT_CACHE_DIR = "~/.cache/flaxchat/tasks"
MANIFEST = "manifest.json"
_MAX_FILES = 10_000  # a runaway-loop guard; the largest split we use has a handful of files


def parquet_url(repo: str, config: str, split: str, index: int) -> str:
    from flaxchat.data.download import hf_endpoint
    return (f"{hf_endpoint()}/datasets/{repo}/resolve/refs%2Fconvert%2Fparquet/"
            f"{config}/{split}/{index:04d}.parquet")


def split_dir(repo: str, config: str, split: str, cache_dir: str | None) -> str:
    root = os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
    return os.path.join(root, repo.replace("/", "--"), config, split)


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # blocks until the other process has finished
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cached(directory: str) -> list[str] | None:
    """The manifest's file paths when the manifest exists and every file reads back, else None."""
    from flaxchat.data.download import is_valid_parquet
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            names = json.load(f)
    except (OSError, ValueError):
        return None
    paths = [os.path.join(directory, n) for n in names]
    return paths if paths and all(is_valid_parquet(p) for p in paths) else None


def _http_status(error: DownloadError) -> int | None:
    # download_file reports a non-retryable 4xx as "download failed: HTTP <code> for <url>"
    match = re.search(r"HTTP (\d{3}) for ", str(error))
    return int(match.group(1)) if match else None


def hf_parquet_files(repo: str, config: str, split: str, cache_dir: str | None = None,
                     timeout_s: float = 60.0, retries: int = 5, backoff_s: float = 1.0) -> list[str]:
    """Local paths of all parquet files of `repo`/`config`/`split`, downloading what is missing."""
    from flaxchat.data.download import download_file, is_valid_parquet
    directory = split_dir(repo, config, split, cache_dir)
    paths = _cached(directory)
    if paths is not None:
        return paths
    with _locked(directory):
        paths = _cached(directory)  # another process may have finished while we waited
        if paths is not None:
            return paths
        names: list[str] = []
        for index in range(_MAX_FILES):
            name = f"{index:04d}.parquet"
            path = os.path.join(directory, name)
            if not is_valid_parquet(path):  # files left by an interrupted run are reused
                url = parquet_url(repo, config, split, index)
                try:
                    download_file(url, path, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
                except DownloadError as e:
                    if _http_status(e) == 404 and index > 0:
                        break  # past the last file of the split
                    if _http_status(e) == 404:
                        raise TaskError(
                            f"dataset {repo} has no parquet export for config {config!r} split {split!r} "
                            f"({url} returned HTTP 404); check the dataset, config and split names"
                        ) from e
                    raise TaskError(f"could not fetch dataset {repo} ({config}/{split}): {e}") from e
            names.append(name)
        tmp = os.path.join(directory, f".{MANIFEST}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(names, f)
        os.replace(tmp, os.path.join(directory, MANIFEST))  # the manifest appears only when complete
        return [os.path.join(directory, n) for n in names]


def hf_parquet_table(repo: str, config: str, split: str, cache_dir: str | None = None,
                     timeout_s: float = 60.0, retries: int = 5, backoff_s: float = 1.0):
    """All files of the split concatenated into one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths = hf_parquet_files(repo, config, split, cache_dir, timeout_s, retries, backoff_s)
    tables = [pq.read_table(p) for p in paths]
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as e:
        raise TaskError(f"the parquet files of {repo} ({config}/{split}) have different schemas: {e}; "
                        f"delete {split_dir(repo, config, split, cache_dir)} and retry") from e


def hf_parquet_rows(repo: str, config: str, split: str, cache_dir: str | None = None,
                    timeout_s: float = 60.0, retries: int = 5, backoff_s: float = 1.0) -> list[dict]:
    """Every row of the split as a dict (eager; use `ParquetRows` for large splits)."""
    return hf_parquet_table(repo, config, split, cache_dir, timeout_s, retries, backoff_s).to_pylist()


class ParquetRows(Sequence):
    """Read-only, lazily materialised rows of a pyarrow Table, optionally in a permuted order."""

    def __init__(self, table: Any, permutation: Any = None):
        self.table = table
        self.permutation = permutation

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        j = i if self.permutation is None else int(self.permutation[i])
        return self.table.slice(j, 1).to_pylist()[0]

    def shuffled(self, seed: int) -> "ParquetRows":
        # np.random.default_rng(seed).permutation is what `datasets.Dataset.shuffle(seed=...)` uses,
        # so with nanochat's seed 42 the row order (and thus e.g. "the first 420 GSM8K test
        # problems") is the same as nanochat's.
        import numpy as np
        return ParquetRows(self.table, np.random.default_rng(seed).permutation(len(self)))


class HFTask(Task):
    """A task over one split of a Hub dataset, fetched on first use (not at construction), so
    building a task list costs nothing until examples are asked for.

    `rows` (any sequence of dicts) replaces the download, for local files and tests.
    `shuffle_seed` (None = file order) shuffles rows the way nanochat does (seed 42).
    """

    repo: str = ""

    def __init__(self, config: str, split: str, *, cache_dir: str | None = None,
                 rows: Sequence[dict] | None = None, shuffle_seed: int | None = 42,
                 timeout_s: float = 60.0, retries: int = 5, **slice_kw: Any):
        super().__init__(**slice_kw)
        self.config, self.split, self.cache_dir = config, split, cache_dir
        self.shuffle_seed, self.timeout_s, self.retries = shuffle_seed, timeout_s, retries
        self._rows: Sequence[dict] | None = None
        if rows is not None:
            self._rows = _shuffle_list(list(rows), shuffle_seed)

    @property
    def rows(self) -> Sequence[dict]:
        if self._rows is None:
            table = hf_parquet_table(self.repo, self.config, self.split, self.cache_dir,
                                     self.timeout_s, self.retries)
            rows = ParquetRows(table)
            self._rows = rows if self.shuffle_seed is None else rows.shuffled(self.shuffle_seed)
        return self._rows

    def num_examples(self) -> int:
        return len(self.rows)

    @property
    def name(self) -> str:
        return f"{type(self).__name__}({self.config}/{self.split})"


def _shuffle_list(rows: list[dict], seed: int | None) -> list[dict]:
    if seed is None:
        return rows
    import numpy as np
    return [rows[int(j)] for j in np.random.default_rng(seed).permutation(len(rows))]
