"""The flow with `mesh.num_parallel=2`: every training stage a Metaflow @parallel step of two real
processes joined by jax.distributed (gloo CPU collectives), run locally.

- the two-process pretrain ends where one process ends that trains on the same global batches
  with the same mesh (tests/_emulated_hosts.py): the same loss curve and final parameters, to the
  tolerance of the 2-process checks in tests/test_distributed.py;
- only node 0 wrote the manifest, metrics.jsonl and card; the join hands node 0's manifest on;
- one worker SIGKILLed mid-pretrain after a checkpoint: `resume` reruns the whole gang (Metaflow
  reruns every task of a @parallel step), every process continues from the last checkpoint, and
  the final parameters equal the uninterrupted two-process run's.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from card_utils import card_text
from test_flow import FLOW, ROOT, TINY

# Two processes with one CPU device each. Each process reads its own parquet row groups, so every
# split needs at least two: the demo corpus' row groups hold 1024 documents, SFT's 256 conversations.
# One micro-batch of 2 rows x 128 tokens per device is 512 tokens per step over the two devices.
TWO = {"mesh": {"num_parallel": 2},
       "data": {"demo_documents": 2048, "demo_val_documents": 2048},
       "tasks": {"demo_conversations": 240, "demo_problems": 40, "demo_val": 130},
       "pretrain": {"total_batch_size": 512}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(tmp_path, extra: dict) -> str:
    import yaml
    cfg = json.loads(json.dumps(TINY))
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg["eval"]["cache_dir"] = str(tmp_path / "eval-cache")
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env(mf_env) -> dict:
    # @parallel starts the workers with the bare `python` on PATH: this interpreter's comes first;
    # a private coordinator port, so parallel test sessions do not meet each other
    # (and only this checkout's metaflow_extensions: another one on sys.path would clash)
    return {**mf_env, "PYTHONPATH": str(ROOT), "METAFLOW_EXTENSIONS_SEARCH_DIRS": str(ROOT),
            "FLAXCHAT_COORDINATOR_PORT": str(_free_port())}


def _run(mf_env, tmp_path, config: str):
    from metaflow import Flow, Runner, namespace
    runner = Runner(FLOW, show_output=False, env=_env(mf_env), cwd=mf_env["METAFLOW_DATASTORE_SYSROOT_LOCAL"],
                    config=[("config", config)])
    with runner.run(preset="demo", artifact_root=str(tmp_path / "art")) as running:
        assert running.status == "successful", running.stderr[-4000:]
        run_id = running.run.id
    namespace(None)
    return Flow("FullPipelineFlow")[run_id]


def _final_params(manifest: dict) -> dict[str, np.ndarray]:
    """The stage's final parameters, read back from its checkpoint (both processes' shards)."""
    import jax
    from flax import nnx

    from flaxchat.config import PipelineConfig
    from flaxchat.model.gpt import GPT
    from steps.training import restore_params, upstream_state_dir
    model = GPT(PipelineConfig.from_dict(manifest["config"]).model, rngs=nnx.Rngs(0))
    restore_params(model, upstream_state_dir(manifest))
    flat = jax.tree_util.tree_flatten_with_path(model.param_tree())[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def test_training_stages_are_parallel_steps_each_with_its_join():
    """The DAG: each launch step fans out to num_parallel processes; every training step
    is @parallel and ends in a join that no other step shares."""
    from metaflow.graph import FlowGraph

    from flows.full_pipeline import FullPipelineFlow
    graph = FlowGraph(FullPipelineFlow)
    for before, stage in (("launch_pretrain", "pretrain"), ("launch_sft", "sft"), ("launch_grpo", "grpo")):
        assert graph[before].parallel_foreach and graph[before].out_funcs == [stage], before
        assert graph[stage].parallel_step, stage
        assert graph[stage].out_funcs == [f"{stage}_join"] and graph[f"{stage}_join"].type == "join", stage
    assert graph["pretrain_join"].out_funcs == ["launch_sft"] and graph["grpo_join"].out_funcs == ["eval"]


def test_num_parallel_below_one_is_refused():
    from flaxchat.config import ConfigError, build_config
    assert build_config("demo").mesh.num_parallel == 1
    assert build_config("demo", overrides={"mesh": {"num_parallel": 2}}).mesh.num_parallel == 2
    with pytest.raises(ConfigError, match=r"mesh.num_parallel=0: use 1 \(one process\)"):
        build_config("demo", overrides={"mesh": {"num_parallel": 0}})


def test_a_process_other_than_0_writes_only_its_checkpoint_shards(tmp_path, monkeypatch):
    """One process standing in for process 1 of a job: it trains and checkpoints, and returns the
    manifest it computed, but writes no manifest, metrics, tokenizer copy or wandb files."""
    import steps.training
    from flaxchat.config import build_config
    from steps import pretrain, tokenizer

    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg["pretrain"].update(num_steps=2, eval_every=2, sample_every=0)
    config = build_config("demo", overrides=cfg)
    tok = tokenizer.run(config, {}, str(tmp_path / "tok"))
    monkeypatch.setenv("WANDB_MODE", "offline")          # process 0 would write wandb files here
    monkeypatch.setattr(steps.training, "writes_outputs", lambda: False)
    manifest = pretrain.run(config, {"tokenizer": tok}, str(tmp_path / "worker"))
    out = tmp_path / "worker"
    assert manifest["metrics"]["steps"] == 2 and manifest["checkpoint"]["step"] == 2
    assert (out / "checkpoints" / "2" / "state").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    """One uninterrupted flow run with two processes per training stage."""
    tmp = tmp_path_factory.mktemp("two")
    env = {k: os.environ[k] for k in ("METAFLOW_DATASTORE_SYSROOT_LOCAL", "METAFLOW_USER",
                                      "METAFLOW_DEFAULT_METADATA", "METAFLOW_DEFAULT_DATASTORE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    cwd = os.getcwd()
    os.chdir(env["METAFLOW_DATASTORE_SYSROOT_LOCAL"])   # cards are found from the working directory
    try:
        config = _overrides(tmp, TWO)
        return {"run": _run(env, tmp, config), "config": config, "tmp": tmp, "env": env}
    finally:
        os.chdir(cwd)


@pytest.mark.slow   # a two-process flow run is minutes on 2 CPU cores
def test_every_training_stage_ran_as_two_processes_and_node_0_wrote_the_outputs(two_process):
    from metaflow.cards import get_cards

    from flaxchat.manifest import verify_files
    run = two_process["run"]
    for stage in ("pretrain", "sft", "grpo"):
        tasks = list(run[stage])
        assert len(tasks) == 2, stage
        manifests = {t.metadata_dict.get("internal_task_type"): getattr(t.data, f"{stage}_manifest") for t in tasks}
        lead = manifests.pop("control_task")                # node 0, the control task
        assert list(manifests.values()) == [None], stage      # the worker returned none
        joined = getattr(run[f"{stage}_join"].task.data, f"{stage}_manifest")
        same = json.dumps(joined, sort_keys=True, default=str) == json.dumps(lead, sort_keys=True, default=str)
        assert same and joined["metrics"]["steps"] == TINY[stage]["num_steps"], stage   # json: NaN (mfu on CPU)
        verify_files(joined)
        out = Path(joined["uri"])
        # one writer: every step's event is in metrics.jsonl exactly once
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [e["step"] for e in events if e["kind"] == "train"]
        assert steps and steps == sorted(set(steps)), stage
        written = json.loads((out / "manifest.json").read_text())["metrics"]
        assert written["params_sha256"] == joined["metrics"]["params_sha256"], stage
        # both processes wrote their own shards of the final checkpoint
        state = Path(joined["checkpoint"]["dir"]) / str(joined["checkpoint"]["step"]) / "state"
        assert {p.name for p in state.glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}, stage
        # the live card and the summary on node 0's card only
        shown = {}
        for t in tasks:
            cards = get_cards(t, id=stage)
            shown[t.metadata_dict.get("internal_task_type")] = card_text(cards[0].get()) if len(cards) else ""
        assert "Result:" in shown["control_task"] and f"step {TINY[stage]['num_steps']}/" in shown["control_task"]
        assert "Result:" not in shown[None] and "loss" not in shown[None], stage
    pre = run["pretrain_join"].task.data.pretrain_manifest
    assert run["sft_join"].task.data.sft_manifest["parent"]["uri"] == pre["uri"]
    assert run["eval"].task.data.eval_manifest["models"]["BASE"] == pre["uri"]
    assert run["eval"].task.data.eval_manifest["report"]["environment"]["processes"] == 1   # eval: one process


@pytest.mark.slow   # a two-process flow run is minutes on 2 CPU cores
def test_two_processes_equal_one_process_with_the_same_global_batch(two_process):
    """The emulated reference: one process, two host devices, both processes' loaders stacked."""
    run, tmp = two_process["run"], two_process["tmp"]
    pre = run["pretrain_join"].task.data.pretrain_manifest
    tok = run["tokenizer"].task.data.tokenizer_manifest
    ref_out = tmp / "reference"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_emulated_hosts.py"), "2", "pretrain",
                           "--input", f"tokenizer={tok['uri']}", "--out", str(ref_out),
                           "--config", two_process["config"]],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads((ref_out / "manifest.json").read_text())
    assert ref["metrics"]["grad_accum_steps"] == pre["metrics"]["grad_accum_steps"] == 1
    assert [h["step"] for h in pre["history"]] == [h["step"] for h in ref["history"]]
    np.testing.assert_allclose([h["loss"] for h in pre["history"]], [h["loss"] for h in ref["history"]], rtol=1e-5)
    np.testing.assert_allclose([e["val_bpb"] for e in pre["evals"]], [e["val_bpb"] for e in ref["evals"]], rtol=1e-5)
    multi, single = _final_params(pre), _final_params(ref)
    assert multi.keys() == single.keys()
    for name in multi:
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow   # a two-process flow run is minutes on 2 CPU cores
def test_killed_worker_resumes_every_process_from_the_last_checkpoint(two_process):
    """SIGKILL node 1 while it assembles pretrain's 6th batch (the step-2 save has landed, step 4's
    may be in flight); node 0 fails with it. `resume` reruns both pretrain processes, which continue
    from the origin's last checkpoint to the uninterrupted run's parameters."""
    from metaflow import Flow, Runner, namespace
    tmp = two_process["tmp"] / "killed"
    tmp.mkdir()
    env = _env(two_process["env"])
    # a plain subprocess, as in test_flow._killed; the kill hook goes first on PYTHONPATH, this tree next
    # its own artifact root: in the uninterrupted run's, every stage would be reused (flaxchat/reuse.py)
    proc = subprocess.run([sys.executable, FLOW, "--config", "config", two_process["config"], "run", "--preset",
                           "demo", "--artifact-root", str(tmp / "art"), "--run-id-file",
                           str(tmp / "origin-run-id")],
                          cwd=env["METAFLOW_DATASTORE_SYSROOT_LOCAL"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env, "KILL_MODE": "batch:6", "KILL_STAGE": "pretrain", "KILL_NODE": "1",
                               "PYTHONPATH": f"{ROOT / 'tests' / 'killhook'}{os.pathsep}{ROOT}"})
    assert proc.returncode != 0, "the run was supposed to be killed"
    origin_id = (tmp / "origin-run-id").read_text().strip()
    saved = tmp / "art" / "FullPipelineFlow" / origin_id / "pretrain" / "checkpoints"
    assert any(p.name.isdigit() for p in saved.iterdir()), "no checkpoint landed before the kill"

    resumer = Runner(FLOW, show_output=False, env=env, cwd=env["METAFLOW_DATASTORE_SYSROOT_LOCAL"])
    with resumer.resume(origin_run_id=origin_id) as resumed:
        assert resumed.status == "successful", resumed.stderr[-4000:]
        new_id = resumed.run.id
    namespace(None)
    run = Flow("FullPipelineFlow")[new_id]
    assert "origin-task-id" in run["tokenizer"].task.metadata_dict          # cloned, not rerun
    assert len(list(run["pretrain"])) == 2
    pre = run["pretrain_join"].task.data.pretrain_manifest
    assert pre["metrics"]["resumed_from_step"] >= 2 and pre["metrics"]["steps"] == 6
    assert f"/{new_id}/pretrain" in pre["uri"]

    reference = two_process["run"]["pretrain_join"].task.data.pretrain_manifest
    same_tokenizer = run["tokenizer"].task.data.tokenizer_manifest["files"] == \
        two_process["run"]["tokenizer"].task.data.tokenizer_manifest["files"]
    assert same_tokenizer, "the tokenizer stage is not deterministic; the runs cannot be compared"
    assert pre["metrics"]["params_sha256"] == reference["metrics"]["params_sha256"]
    assert [h["loss"] for h in pre["history"]] == [h["loss"] for h in reference["history"]]
