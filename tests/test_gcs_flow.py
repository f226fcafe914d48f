"""The whole demo flow on GCS: Metaflow's datastore, the artifact root (data, checkpoints, metrics,
manifests) and orbax all on gs:// (the gcp-storage-emulator on 127.0.0.1), with a task killed
mid-pretraining and `resume`; plus the server-side adoption of a final checkpoint on gs://.

Nothing of the run touches the local disk but Metaflow's local metadata and the data cache: the
staged shards, checkpoints (orbax writes them straight to gs://), metrics.jsonl (streamed while
training) and manifests are objects in the emulator's bucket, read back through flaxchat.storage.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flaxchat import storage

import gcs_emulator
from gcs_emulator import gcs_bucket  # noqa: F401  (fixture)
from test_flow import TINY

ROOT = Path(__file__).resolve().parents[1]
FLOW = str(ROOT / "flows" / "full_pipeline.py")
KILLHOOK = str(Path(__file__).resolve().parent / "killhook")


def _with_root(pythonpath: str) -> str:
    """PYTHONPATH with the repo root first (for metaflow_extensions), each directory once: Metaflow
    refuses an extension package it finds twice."""
    parts = [str(ROOT)] + [p for p in pythonpath.split(os.pathsep) if p and os.path.abspath(p) != str(ROOT)]
    return os.pathsep.join(parts)


def _flow_env(tmp_path, bucket: str, **extra) -> dict[str, str]:
    """A Metaflow run whose datastore is gs://<bucket>/metaflow on the emulator."""
    mf_local = tmp_path / "mf"
    mf_local.mkdir(exist_ok=True)
    return {
        **os.environ,
        **gcs_emulator.client_env(os.environ["STORAGE_EMULATOR_HOST"]),
        "METAFLOW_DEFAULT_DATASTORE": "gs",
        "METAFLOW_DATASTORE_SYSROOT_GS": f"{bucket}/metaflow",
        "METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER": "gcs-emulator",   # metaflow_extensions/flaxchat
        "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(mf_local),
        "METAFLOW_USER": "tester",
        "WANDB_MODE": "disabled",
        "FLAXCHAT_LOG_FLUSH_RECORDS": "1",     # every logged record reaches gs:// before the next step
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # the repo root for metaflow_extensions (an installed flaxchat has it on the path anyway)
        "PYTHONPATH": _with_root(os.environ.get("PYTHONPATH", "")),
        **extra,
    }


def _flow(env, tmp_path, args, id_name, expect_ok):
    id_file = tmp_path / id_name
    proc = subprocess.run([sys.executable, FLOW, *args, "--run-id-file", str(id_file)], cwd=env[
        "METAFLOW_DATASTORE_SYSROOT_LOCAL"], env=env, capture_output=True, text=True, timeout=1500)
    assert (proc.returncode == 0) == expect_ok, (proc.stdout[-3000:], proc.stderr[-3000:])
    return id_file.read_text().strip(), proc.stdout + proc.stderr


def _manifest(uri: str) -> dict:
    return json.loads(storage.read_text(storage.join(uri, "manifest.json")))


def _client(env, expr: str):
    """Evaluate `expr` with the Metaflow client in a fresh process configured for the gs datastore."""
    code = f"import json; from metaflow import Flow, namespace; namespace(None); print(json.dumps({expr}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=env["METAFLOW_DATASTORE_SYSROOT_LOCAL"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_whole_flow_on_gcs_with_a_killed_pretrain_and_resume(gcs_bucket, tmp_path):
    bucket, art = gcs_bucket, storage.join(gcs_bucket, "flaxchat")
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg["eval"]["cache_dir"] = str(tmp_path / "eval-cache")
    cfg["pretrain"]["log_every"] = 1
    cfg["export"] = {"formats": "nanochat"}            # the other formats are covered by test_flow
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump(cfg))

    # run A: SIGKILLed while assembling pretraining batch 6 (checkpoints 2 and 4 were started)
    env = _flow_env(tmp_path, bucket, KILL_MODE="batch:6", KILL_STAGE="pretrain",
                    PYTHONPATH=os.pathsep.join([KILLHOOK, str(ROOT)]))
    a, log = _flow(env, tmp_path, ["--config", "config", str(overrides), "run", "--preset", "demo", "--artifact-root", art],
                   "run-a", expect_ok=False)
    run_a = storage.join(art, "FullPipelineFlow", a)
    assert "step 5/6" in log, log[-3000:]                 # killed in pretraining, not before

    # the data the run trains on: staged in the bucket, content-addressed, named only by gs:// URIs
    tok = _manifest(storage.join(run_a, "tokenizer"))
    shards = tok["data"]["shards"]
    assert len(shards) >= 2 and all(re.fullmatch(rf"{art}/data/sha256/[0-9a-f]{{64}}\.parquet", s) for s in shards)
    assert [e["uri"] for e in tok["data"]["staged"]] == shards

    # everything pretraining logged before the kill is at the artifact root: the console lines of the
    # killed task are exactly the records of metrics.jsonl
    printed = [(int(s), float(loss)) for s, loss in re.findall(r"step (\d+)/6 loss ([0-9.]+)", log)]
    assert printed and max(s for s, _ in printed) == 5, printed
    records = [json.loads(line) for line in storage.read_text(storage.join(run_a, "pretrain", "metrics.jsonl")).splitlines()]
    assert [(r["step"], round(r["loss"], 4)) for r in records if r["kind"] == "train"] == printed
    assert [r["step"] for r in records if r["kind"] == "eval"] == [int(s) for s in re.findall(r"eval @ (\d+):", log)]
    ckpts = storage.join(run_a, "pretrain", "checkpoints")
    assert {"2"} <= set(storage.listdir(ckpts)) and not storage.exists(storage.join(run_a, "pretrain", "manifest.json"))
    # Metaflow's own datastore is in the bucket too (artifacts, logs, cards)
    assert storage.listdir(storage.join(bucket, "metaflow", "FullPipelineFlow"))

    # resume: start and tokenizer cloned; pretrain continues from run A's gs:// checkpoint
    b, log = _flow(_flow_env(tmp_path, bucket), tmp_path, ["resume", "--origin-run-id", a], "run-b", expect_ok=True)
    run_b = storage.join(art, "FullPipelineFlow", b)
    pre = _manifest(storage.join(run_b, "pretrain"))
    assert pre["metrics"]["resumed_from_step"] in (2, 4) and pre["metrics"]["steps"] == 6
    assert pre["checkpoint"] == {"dir": storage.join(run_b, "pretrain", "checkpoints"), "step": 6}
    assert pre["data"]["shards"] == shards
    from flaxchat.manifest import verify_files
    verify_files(pre)                                    # checksums of the gs:// checkpoint and tokenizer
    assert not storage.exists(storage.join(run_b, "tokenizer"))          # cloned, not rerun
    resumed_log = [json.loads(line) for line in storage.read_text(storage.join(run_b, "pretrain", "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in resumed_log if r["kind"] == "train"] == list(range(pre["metrics"]["resumed_from_step"] + 1, 7))
    for stage in ("sft", "grpo", "eval", "export"):
        assert _manifest(storage.join(run_b, stage))["stage"] == stage
    assert storage.exists(storage.join(run_b, "export", "manifest.json"))

    # the Metaflow client reads the run from the gs datastore: artifacts, and the clone of A's tokenizer
    got = _client(_flow_env(tmp_path, bucket),
                  f"[Flow('FullPipelineFlow')['{b}']['pretrain'].task.data.pretrain_manifest['uri'], "
                  f"Flow('FullPipelineFlow')['{b}']['tokenizer'].task.data.tokenizer_manifest['data']['shards'], "
                  f"Flow('FullPipelineFlow')['{b}'].successful]")
    assert got == [storage.join(run_b, "pretrain"), shards, True]


def test_adopting_a_final_checkpoint_on_gcs_is_a_server_side_copy(gcs_bucket, monkeypatch):
    """`_copy_step` (a resumed stage adopting its origin's final checkpoint) copies gs:// objects inside
    the store: nothing is downloaded, and the copy restores and verifies like the original."""
    import gcsfs
    import jax.numpy as jnp

    from flaxchat.checkpoint import CheckpointStore
    from steps.training import _copy_step

    src_dir, dst_dir = storage.join(gcs_bucket, "adopt", "a"), storage.join(gcs_bucket, "adopt", "b")
    store = CheckpointStore(src_dir, keep=2)
    state = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(3)}
    store.save(6, state, {"note": "final"})
    store.wait()
    assert store.verify(6) is True
    store.close()
    storage.write_text(storage.join(dst_dir, "6", "stale.txt"), "left by a killed attempt")

    def no_download(*a, **k):
        raise AssertionError("bytes downloaded while adopting a gs:// checkpoint")
    with monkeypatch.context() as mp:
        for name in ("_cat_file", "_get_file", "_open"):
            mp.setattr(gcsfs.core.GCSFileSystem, name, no_download)
        mp.setattr(storage, "fetch_dir", no_download)
        _copy_step(storage.join(src_dir, "6"), storage.join(dst_dir, "6"))

    adopted = CheckpointStore(dst_dir, keep=2)
    assert adopted.steps() == [6] and adopted.verify(6) is True          # the stale file is gone
    import jax
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    step, restored, meta = adopted.restore_latest(target)
    assert step == 6 and meta["note"] == "final"
    assert jnp.array_equal(restored["w"], state["w"]) and jnp.array_equal(restored["b"], state["b"])
    adopted.close()


def _metaflow_provider(env_extra: dict) -> subprocess.CompletedProcess:
    """Which GCP client Metaflow builds, asked in a fresh process (Metaflow reads its config at import)."""
    code = ("from metaflow.plugins import GCP_CLIENT_PROVIDERS\n"
            "from metaflow.metaflow_config import DEFAULT_GCP_CLIENT_PROVIDER as d\n"
            "print(sorted(p.name for p in GCP_CLIENT_PROVIDERS), d)\n"
            "if d == 'gcs-emulator':\n"
            "    from metaflow.plugins.gcp.gs_storage_client_factory import get_gs_storage_client\n"
            "    c = get_gs_storage_client()\n"
            "    print(type(c._credentials).__name__, c.project)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER", "STORAGE_EMULATOR_HOST")}
    env["PYTHONPATH"] = _with_root(os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env={**env, **env_extra}, capture_output=True, text=True,
                          timeout=120)


def test_the_emulator_client_provider_is_registered_and_only_used_when_selected():
    default = _metaflow_provider({})
    assert default.returncode == 0, default.stderr
    assert default.stdout.split("\n")[0] == "['gcp-default', 'gcs-emulator'] gcp-default"   # a real bucket: ADC
    chosen = _metaflow_provider({"METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER": "gcs-emulator",
                                 "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"})
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.split("\n")[1] == "AnonymousCredentials test"
    missing = _metaflow_provider({"METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER": "gcs-emulator"})
    assert missing.returncode != 0 and "gcs-emulator needs STORAGE_EMULATOR_HOST" in missing.stderr
