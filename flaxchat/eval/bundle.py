"""The DCLM eval bundle behind nanochat's CORE metric: find it, fetch it, read its tasks.

A bundle is a directory (or a .zip holding one, possibly under a single top-level folder such
as `eval_bundle/`) with
  core.yaml            `icl_tasks:` list of {label, dataset_uri, num_fewshot ([n] or n),
                       icl_task_type, continuation_delimiter (default " ")}
  eval_meta_data.csv   columns `Eval Task` and `Random baseline` (percent)
  eval_data/<dataset_uri>   JSONL, one example per line:
      multiple_choice    {query, choices, gold}
      schema             {context_options, continuation, gold}
      language_modeling  {context, continuation}

`load_core_bundle(source)` takes a local directory, a local .zip, a `gs://` directory or .zip
(through `flaxchat.storage`), or an http(s) URL of a .zip (nanochat's is `EVAL_BUNDLE_URL`).
Remote and zipped bundles are unpacked once into `cache_dir` and reused: downloads stream to a
temp file renamed into place when complete (retries with backoff on connection errors,
timeouts, HTTP 5xx/408/429, truncated or non-zip bodies), and archives are extracted into a
temp directory renamed into place, so a half-written bundle is never seen under its name.

Examples are shuffled with `random.Random(1337)` at load, as nanochat's base_eval.py does before
taking `max_per_task` and before the few-shot draws index into the list: `task.examples` is in
nanochat's evaluation order (pass `shuffle=False` to keep file order).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import uuid
import zipfile
from typing import Any

import yaml

from flaxchat import storage

log = logging.getLogger(__name__)

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
DEFAULT_CACHE_DIR = "~/.cache/flaxchat/eval"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
REQUIRED_KEYS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}
SHUFFLE_SEED = 1337


class EvalError(ValueError):
    """An eval bundle or example that cannot be used; the message names the file/task and the fix."""


@dataclasses.dataclass
class CoreTask:
    """One CORE task: its examples (dicts as in the JSONL) and how to prompt and score them."""
    label: str
    task_type: str                    # multiple_choice | schema | language_modeling
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float            # a fraction (eval_meta_data.csv gives percent)
    examples: list[dict[str, Any]]


# --------------------------------------------------------------------------- reading a bundle dir

def _bundle_root(directory: str) -> str | None:
    """The directory holding core.yaml: `directory` itself or its only subdirectory."""
    if os.path.isfile(os.path.join(directory, "core.yaml")):
        return directory
    subdirs = [d for d in os.listdir(directory)
               if os.path.isdir(os.path.join(directory, d)) and not d.startswith((".", "__MACOSX"))]
    if len(subdirs) == 1 and os.path.isfile(os.path.join(directory, subdirs[0], "core.yaml")):
        return os.path.join(directory, subdirs[0])
    return None


def _read_baselines(path: str) -> dict[str, float]:
    if not os.path.isfile(path):
        raise EvalError(f"eval bundle has no eval_meta_data.csv at {path}")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or ())
        if missing:
            raise EvalError(f"{path} lacks column(s) {sorted(missing)} (has {reader.fieldnames})")
        out = {}
        for row in reader:
            try:
                out[row["Eval Task"].strip()] = float(row["Random baseline"]) / 100.0
            except (TypeError, ValueError) as e:
                raise EvalError(f"{path}: bad Random baseline {row['Random baseline']!r} for "
                                f"{row['Eval Task']!r}") from e
    return out


def _read_examples(path: str, label: str, task_type: str) -> list[dict[str, Any]]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"task {label}: {path} line {lineno} is not JSON ({e})") from e
            if not isinstance(item, dict):
                raise EvalError(f"task {label}: {path} line {lineno} is not a JSON object")
            missing = [k for k in REQUIRED_KEYS[task_type] if k not in item]
            if missing:
                raise EvalError(f"task {label}: {path} line {lineno} lacks {missing} "
                                f"(a {task_type} example needs {list(REQUIRED_KEYS[task_type])})")
            examples.append(item)
    if not examples:
        raise EvalError(f"task {label}: {path} has no examples")
    return examples


def _num_fewshot(value: Any, label: str) -> int:
    if isinstance(value, (list, tuple)):
        if not value:
            raise EvalError(f"task {label}: num_fewshot is an empty list in core.yaml")
        value = value[0]                       # nanochat evaluates the first setting
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EvalError(f"task {label}: num_fewshot must be a non-negative int or [int], got {value!r}")
    return value


def read_bundle_dir(directory: str, shuffle: bool = True) -> list[CoreTask]:
    """Parse an unpacked bundle directory (or a directory whose only subfolder is one)."""
    root = _bundle_root(directory) if os.path.isdir(directory) else None
    if root is None:
        raise EvalError(f"no core.yaml in {directory} (an eval bundle has core.yaml, eval_meta_data.csv, "
                        f"eval_data/)")
    config_path = os.path.join(root, "core.yaml")
    with open(config_path, encoding="utf-8") as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise EvalError(f"{config_path} is not valid YAML ({e})") from e
    specs = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(specs, list) or not specs:
        raise EvalError(f"{config_path} has no `icl_tasks:` list")
    baselines = _read_baselines(os.path.join(root, "eval_meta_data.csv"))
    tasks = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "label" not in spec:
            raise EvalError(f"{config_path}: icl_tasks[{i}] has no label")
        label = str(spec["label"])
        for key in ("dataset_uri", "num_fewshot", "icl_task_type"):
            if key not in spec:
                raise EvalError(f"task {label}: core.yaml entry lacks {key!r}")
        task_type = spec["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise EvalError(f"task {label}: unknown icl_task_type {task_type!r} (expected one of {list(TASK_TYPES)})")
        data_path = os.path.join(root, "eval_data", spec["dataset_uri"])
        if not os.path.isfile(data_path):
            raise EvalError(f"task {label}: dataset file {data_path} is missing")
        if label not in baselines:
            raise EvalError(f"task {label} is not in eval_meta_data.csv (no random baseline)")
        examples = _read_examples(data_path, label, task_type)
        if shuffle:
            random.Random(SHUFFLE_SEED).shuffle(examples)
        tasks.append(CoreTask(label=label, task_type=task_type,
                              num_fewshot=_num_fewshot(spec["num_fewshot"], label),
                              continuation_delimiter=str(spec.get("continuation_delimiter", " ")),
                              random_baseline=baselines[label], examples=examples))
    return tasks


# --------------------------------------------------------------------------- fetching / unpacking

def _cache_name(source: str, extra: str = "") -> str:
    stem = os.path.basename(source.rstrip("/").split("?")[0]) or "bundle"
    if stem.endswith(".zip"):
        stem = stem[:-4]
    digest = hashlib.sha256(f"{source}\0{extra}".encode()).hexdigest()[:12]
    return f"{stem}-{digest}"


def _extract(zip_path: str, dest: str) -> str:
    """Unzip into a sibling temp dir, then rename the bundle root to `dest` (atomic)."""
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise EvalError(f"{zip_path} is not a zip archive ({e})") from e
        root = _bundle_root(tmp)
        if root is None:
            raise EvalError(f"no core.yaml in {zip_path} (at its top level or under one folder)")
        try:
            os.rename(root, dest)
        except OSError:
            if not os.path.isfile(os.path.join(dest, "core.yaml")):   # not a concurrent winner: real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_url(url: str, dest: str, timeout_s: float = 60.0, retries: int = 5, backoff_s: float = 1.0) -> str:
    """Download `url` to `dest` atomically (temp file + rename) with the data downloader's retries,
    timeouts and backoff; the body must be a zip archive."""
    from flaxchat.data import DownloadError
    from flaxchat.data.download import download_file
    try:
        return download_file(url, dest, timeout_s, retries, backoff_s, validate=zipfile.is_zipfile,
                             what="a zip archive", hint="check eval.core_bundle")
    except DownloadError as exc:
        raise EvalError(f"could not download the eval bundle: {exc}") from exc


def resolve_bundle_dir(source: str | os.PathLike, cache_dir: str = DEFAULT_CACHE_DIR, *,
                       timeout_s: float = 60.0, retries: int = 5, backoff_s: float = 1.0) -> str:
    """A local directory holding the bundle named by `source` (fetched/unpacked into cache_dir once)."""
    source = str(source)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    is_url = source.startswith(("http://", "https://"))
    is_zip = source.split("?")[0].endswith(".zip")
    if not is_url and not storage.is_remote(source):
        if os.path.isdir(source):
            return source
        if not os.path.isfile(source):
            raise EvalError(f"eval bundle {source} does not exist (give a directory, .zip, gs:// URI or URL)")
        if not zipfile.is_zipfile(source):
            raise EvalError(f"eval bundle {source} is neither a directory nor a zip archive")
        st = os.stat(source)
        dest = os.path.join(cache_dir, _cache_name(os.path.abspath(source), f"{st.st_size}:{st.st_mtime_ns}"))
        if not os.path.isfile(os.path.join(dest, "core.yaml")):
            os.makedirs(cache_dir, exist_ok=True)
            _extract(source, dest)
        return dest
    dest = os.path.join(cache_dir, _cache_name(source))
    if os.path.isfile(os.path.join(dest, "core.yaml")):
        return dest                                            # cached: no request
    os.makedirs(cache_dir, exist_ok=True)
    if not is_url and storage.is_remote(source) and not is_zip:
        return storage.fetch_dir(source, dest)
    zip_path = os.path.join(cache_dir, f".{os.path.basename(dest)}-{uuid.uuid4().hex[:12]}.zip")
    try:
        if is_url:
            fetch_url(source, zip_path, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
        else:  # streamed: the bundle is large and zip_path is already a private temp name
            with storage.open_read(source) as src, open(zip_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        _extract(zip_path, dest)
    finally:
        if os.path.exists(zip_path):
            os.unlink(zip_path)
    return dest


def load_core_bundle(source: str | os.PathLike = EVAL_BUNDLE_URL, cache_dir: str = DEFAULT_CACHE_DIR, *,
                     shuffle: bool = True, timeout_s: float = 60.0, retries: int = 5,
                     backoff_s: float = 1.0) -> list[CoreTask]:
    """The CORE tasks of the bundle at `source` (dir, .zip, gs://, or http(s) URL), in core.yaml order."""
    return read_bundle_dir(resolve_bundle_dir(source, cache_dir, timeout_s=timeout_s, retries=retries,
                                              backoff_s=backoff_s), shuffle=shuffle)


__all__ = ["CoreTask", "EvalError", "EVAL_BUNDLE_URL", "load_core_bundle", "read_bundle_dir",
           "resolve_bundle_dir", "fetch_url"]
