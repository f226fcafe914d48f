"""Multi-process start-up and data-parallel exactness.

Two real processes on 127.0.0.1 (gloo CPU collectives, one CPU device each) each load
half of a fixed global batch and take one SGD step of the tiny GPT; every param must
come out bit-for-bit identical in both processes and identical to one process running
the same 2-way data-parallel program over 2 local devices. Against a 1-device run the
result is only equal to fp32 rounding (see test_one_device_run_matches_to_rounding).
The real training loop (PackedLoader, checkpoints) runs in 2 processes too: killed after a
checkpoint and restarted, both resume their own loader positions and end bit for bit where
an uninterrupted 2-process run ends (see `resumed_training`).
Everything JAX runs in subprocesses with timeouts, so a broken init can't hang or
poison the test process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxchat.distributed import DEFAULT_COORDINATOR_PORT, DistributedInitError, detect_cluster

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_dist_worker.py"
_CLUSTER_ENV = ("FLAXCHAT_", "MF_PARALLEL_", "TPU_WORKER_HOSTNAMES", "MEGASCALE_", "JAX_COORDINATOR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_ENV)} | extra
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    return env


def _start(*args: str, devices: int = 1, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=_env(devices, **env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, dict, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"worker hung past {timeout}s:\n{out[-2000:]}\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]   # gloo logs to stdout too
    return proc.returncode, (json.loads(lines[-1]) if lines else {}), err


# --------------------------------------------------------------------------- cluster detection (pure)

def test_detect_cluster_precedence():
    mf = {"MF_PARALLEL_MAIN_IP": "10.0.0.5", "MF_PARALLEL_NUM_NODES": "4", "MF_PARALLEL_NODE_INDEX": "2"}
    explicit = {"FLAXCHAT_COORDINATOR": "h:1", "FLAXCHAT_NUM_PROCESSES": "2", "FLAXCHAT_PROCESS_ID": "1"}
    tpu = {"TPU_WORKER_HOSTNAMES": "w0,w1"}
    assert detect_cluster({}).source == "single"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "w0"}).source == "single"   # one host: nothing to join
    assert detect_cluster(tpu).source == "auto"
    spec = detect_cluster({**tpu, **mf})
    assert (spec.source, spec.coordinator, spec.num_processes, spec.process_id) == \
        ("metaflow", f"10.0.0.5:{DEFAULT_COORDINATOR_PORT}", 4, 2)
    assert detect_cluster({**mf, "FLAXCHAT_COORDINATOR_PORT": "9000"}).coordinator == "10.0.0.5:9000"
    spec = detect_cluster({**tpu, **mf, **explicit})
    assert (spec.source, spec.coordinator, spec.num_processes, spec.process_id) == ("env", "h:1", 2, 1)
    spec = detect_cluster({**explicit}, coordinator="a:2", num_processes=3, process_id=0)
    assert (spec.source, spec.coordinator, spec.num_processes) == ("args", "a:2", 3)


def test_detect_cluster_rejects_incomplete_or_bad_settings():
    with pytest.raises(DistributedInitError, match="FLAXCHAT_PROCESS_ID not set"):
        detect_cluster({"FLAXCHAT_COORDINATOR": "h:1", "FLAXCHAT_NUM_PROCESSES": "2"})
    with pytest.raises(DistributedInitError, match="must be an integer"):
        detect_cluster({"FLAXCHAT_COORDINATOR": "h:1", "FLAXCHAT_NUM_PROCESSES": "two", "FLAXCHAT_PROCESS_ID": "0"})
    with pytest.raises(DistributedInitError, match=r"process_id=2 must be in \[0, 2\)"):
        detect_cluster({}, coordinator="h:1", num_processes=2, process_id=2)
    with pytest.raises(DistributedInitError, match="must look like host:port"):
        detect_cluster({}, coordinator="hostonly", num_processes=2, process_id=0)
    with pytest.raises(DistributedInitError, match="pass all of"):
        detect_cluster({}, coordinator="h:1")


def test_single_process_is_a_noop_and_idempotent(monkeypatch):
    from flaxchat import distributed
    for key in list(os.environ):
        if key.startswith(_CLUSTER_ENV):
            monkeypatch.delenv(key)
    monkeypatch.setattr(distributed, "_ACTIVE", None)
    first = distributed.initialize_distributed()
    assert first.source == "single" and first.num_processes == 1
    assert distributed.initialize_distributed() is first


# --------------------------------------------------------------------------- failures are errors, not hangs

def test_unreachable_coordinator_and_missing_peer_raise_clear_errors():
    closed = _free_port()   # nothing listens here
    peer = _start("--coordinator", f"127.0.0.1:{closed}", "--num-processes", "2", "--process-id", "1",
                  "--timeout", "2", "--init-only")
    lonely = _free_port()
    coordinator = _start("--coordinator", f"127.0.0.1:{lonely}", "--num-processes", "3", "--process-id", "0",
                         "--timeout", "2", "--init-only")
    rc, report, err = _finish(peer, timeout=90)
    assert rc == 3 and report.get("error") == "DistributedInitError", f"rc={rc} {report} {err[-2000:]}"
    message = report["message"]
    assert f"127.0.0.1:{closed}" in message and "2s" in message and "firewall" in message
    rc, report, err = _finish(coordinator, timeout=90)
    assert rc == 3 and report.get("error") == "DistributedInitError", f"rc={rc} {report} {err[-2000:]}"
    assert "processes [1, 2] never checked in" in report["message"] and f"127.0.0.1:{lonely}" in report["message"]


# --------------------------------------------------------------------------- one DP step, two processes

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Start all four runs at once (they are independent) and collect their reports."""
    tmp = tmp_path_factory.mktemp("dist")
    address = f"127.0.0.1:{_free_port()}"
    procs = {f"proc{i}": _start("--coordinator", address, "--num-processes", "2", "--process-id", str(i),
                                "--timeout", "120", "--npz", str(tmp / f"proc{i}.npz")) for i in range(2)}
    # one process, two local devices; it also runs the step on one of them ("local1")
    procs["local2"] = _start("--npz", str(tmp / "local2.npz"), "--one-device-npz", str(tmp / "local1.npz"),
                             devices=2)
    out = {}
    for name, proc in procs.items():
        rc, report, err = _finish(proc)
        assert rc == 0 and "hashes" in report, f"{name} failed (rc={rc}):\n{err[-4000:]}"
        out[name] = report
    out["local1"] = out["local2"].pop("one_device")
    for name, report in out.items():
        report["params"] = dict(np.load(tmp / f"{name}.npz"))
    return out


def test_each_process_loaded_its_half(runs):
    assert [runs[p]["process_count"] for p in ("proc0", "proc1")] == [2, 2]
    assert runs["proc0"]["rows"] == [0, 2] and runs["proc1"]["rows"] == [2, 4]
    assert runs["local2"]["devices"] == 2 and runs["local1"]["devices"] == 1


def test_step_changed_every_weight(runs):
    """Else the bitwise checks would say nothing about those weights. Scalars may stay put:
    backout_lambda's gradient is ~1e-8 at init (the final RMSNorm is scale-invariant)."""
    report, params = runs["proc0"], runs["proc0"]["params"]
    unchanged = [k for k, h in report["hashes"].items() if report["hashes_before"][k] == h]
    assert not [k for k in unchanged if params[k].ndim > 0], f"weights that did not move: {unchanged}"
    assert len(unchanged) <= 1, f"too many params did not move: {unchanged}"


def test_processes_agree_bit_for_bit(runs):
    assert runs["proc0"]["hashes"] == runs["proc1"]["hashes"]
    assert runs["proc0"]["loss"] == runs["proc1"]["loss"]


def test_multi_process_equals_single_process_bit_for_bit(runs):
    """Same global batch, same 2-way data-parallel program: 2 processes x 1 device must give
    exactly what 1 process x 2 devices gives (the cross-process gloo all-reduce of two
    partial sums is a single a+b, which is order-free)."""
    assert runs["proc0"]["hashes"] == runs["local2"]["hashes"]
    assert runs["proc0"]["loss"] == runs["local2"]["loss"]


def test_one_device_run_matches_to_rounding(runs):
    """On one device XLA reduces the batch in one pass instead of two partial sums, so the
    last bits may differ; anything beyond fp32 rounding would be a real bug."""
    multi, single = runs["proc0"]["params"], runs["local1"]["params"]
    assert multi.keys() == single.keys()
    for name in multi:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert abs(runs["proc0"]["loss"] - runs["local1"]["loss"]) <= 1e-5


# --------------------------------------------------------------------------- the training loop, killed and resumed

KILL_AT, TRAIN_STEPS = 3, 6


def _write_text_shards(root: Path, shards: int = 3, docs: int = 32, rows_per_group: int = 4) -> None:
    """Small parquet shards of made-up sentences (the last one is validation), many row groups
    so that each process reads its own (row group number % 2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat dog ran to big red ball and then home".split()
    for s in range(shards):
        texts = [" ".join(rng.choice(words, int(rng.integers(5, 30)))) + "." for _ in range(docs)]
        pq.write_table(pa.table({"text": texts}), root / f"shard_{s}.parquet", row_group_size=rows_per_group)


def _train_pair(data: Path, ckpt: Path, cache: Path, *extra: str) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{_free_port()}"
    return [_start("--coordinator", address, "--num-processes", "2", "--process-id", str(i), "--timeout", "120",
                   "--train", str(data), "--ckpt", str(ckpt), "--steps", str(TRAIN_STEPS), "--every", str(KILL_AT),
                   *extra, **_compile_cache(cache)) for i in range(2)]


def _compile_cache(cache: Path) -> dict[str, str]:
    """A persistent compilation cache private to this module: the first 2-process run compiles the
    train step, the killed and the resumed runs load it (the same executable: numerics unchanged)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _collect(procs: dict[str, subprocess.Popen], out: dict, killed: bool = False) -> None:
    for name, proc in procs.items():
        rc, report, err = _finish(proc)
        if killed:
            assert rc == -signal.SIGKILL, f"{name}: rc={rc}\n{err[-3000:]}"
            continue
        assert rc == 0 and "digest" in report, f"{name} failed (rc={rc}):\n{err[-4000:]}"
        out[name] = report


@pytest.fixture(scope="module")
def resumed_training(tmp_path_factory) -> dict:
    """The real training loop (PackedLoader, Muon+AdamW, FSDP over both processes, async checkpoints):
    an uninterrupted 2-process run; one process running the same program on 2 local devices with
    both processes' loaders (the same global batches); then a 2-process run SIGKILLed right after
    its step-3 checkpoint landed, and its restart."""
    tmp = tmp_path_factory.mktemp("train")
    data, cache = tmp / "data", tmp / "jax-cache"
    _write_text_shards(data)
    out: dict = {}
    procs = dict(zip(("full0", "full1"), _train_pair(data, tmp / "full", cache, "--npz", str(tmp / "full.npz"))))
    procs["single"] = _start("--train", str(data), "--ckpt", str(tmp / "single"), "--steps", str(TRAIN_STEPS),
                             "--every", str(KILL_AT), "--emulate", "2", "--npz", str(tmp / "single.npz"), devices=2)
    _collect(procs, out)
    _collect(dict(zip(("killed0", "killed1"), _train_pair(data, tmp / "resumed", cache, "--kill-at", str(KILL_AT)))),
             out, killed=True)
    out["saved_steps"] = sorted(int(p.name) for p in (tmp / "resumed").iterdir() if p.name.isdigit())
    out["meta"] = json.loads((tmp / "resumed" / str(KILL_AT) / "meta" / "metadata").read_text())
    _collect(dict(zip(("resumed0", "resumed1"), _train_pair(data, tmp / "resumed", cache,
                                                            "--npz", str(tmp / "resumed.npz")))), out)
    out["params"] = {name: dict(np.load(tmp / f"{name}.npz")) for name in ("full", "resumed", "single")}
    out["full_ckpt"] = tmp / "full"
    return out


def test_checkpoint_holds_every_process_loader_position(resumed_training):
    """orbax writes `meta` from process 0 only: both positions must be in it, gathered there."""
    assert resumed_training["saved_steps"] == [KILL_AT]
    loaders = resumed_training["meta"]["loaders"]
    assert [s["process_index"] for s in loaders] == [0, 1] and {s["process_count"] for s in loaders} == {2}
    assert all(s["batches"] == KILL_AT for s in loaders)
    assert loaders[0]["buffer"] != loaders[1]["buffer"]       # each read its own row groups


def test_every_process_resumes_its_own_loader_position(resumed_training):
    loaders = resumed_training["meta"]["loaders"]
    for p in range(2):
        run = resumed_training[f"resumed{p}"]
        assert run["process_index"] == p and run["resumed_from"] == KILL_AT and run["steps"] == TRAIN_STEPS
        assert run["resumed_loader_state"] == loaders[p]


def test_resumed_two_process_run_equals_uninterrupted_bitwise(resumed_training):
    full = resumed_training["full0"]
    for p in range(2):   # params and optimizer state, gathered from both processes' shards
        assert resumed_training[f"resumed{p}"]["digest"] == full["digest"] == resumed_training[f"full{p}"]["digest"]
    assert resumed_training["resumed0"]["losses"] == full["losses"][KILL_AT:]
    for name, value in resumed_training["params"]["full"].items():
        np.testing.assert_array_equal(resumed_training["params"]["resumed"][name], value, err_msg=name)


def test_each_process_wrote_its_own_shards(resumed_training):
    """FSDP over the two processes: nothing gathers a sharded array to one process to save it."""
    assert resumed_training["full0"]["wte_local_shape"] != list(resumed_training["params"]["full"]["wte"].shape)
    state = resumed_training["full_ckpt"] / str(TRAIN_STEPS) / "state"
    for p in range(2):
        written = [f for f in (state / f"ocdbt.process_{p}").rglob("*") if f.is_file()]
        assert sum(f.stat().st_size for f in written) > 100_000, f"process {p} wrote {written}"


def test_the_checksum_file_covers_every_process_shards(resumed_training):
    """Written by process 0's checksum thread once orbax finalised the step (after every process wrote)."""
    import hashlib
    step = resumed_training["full_ckpt"] / str(TRAIN_STEPS)
    sums = json.loads((step / "flaxchat_checksums.json").read_text())
    on_disk = {str(f.relative_to(step)) for f in step.rglob("*") if f.is_file()} - {"flaxchat_checksums.json"}
    assert set(sums) == on_disk and any(k.startswith("state/ocdbt.process_1/") for k in sums)
    for rel, digest in sums.items():
        assert hashlib.sha256((step / rel).read_bytes()).hexdigest() == digest, rel


def test_two_process_training_matches_one_process_with_the_same_global_batch(resumed_training):
    """One process, two local devices, both processes' loaders side by side: the same global batches
    and program, so the same run (to the tolerance used above; in practice bit for bit). On ONE device
    the batch-sum order changes and Muon/AdamW turn that rounding of near-zero gradients into O(lr)
    differences within a few steps (wte ~4e-2 after 6), so that run can't be held to 1e-5."""
    multi, single = resumed_training["params"]["full"], resumed_training["params"]["single"]
    assert multi.keys() == single.keys()
    for name in multi:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(resumed_training["full0"]["losses"], resumed_training["single"]["losses"],
                               rtol=1e-5)
