"""Stage placement without Metaflow: the TPU/GPU tables, the `compute` config section, the
@kubernetes settings a slice implies and the TPU worker environment of a multi-host slice."""

import pytest

from flaxchat.compute import (ComputeError, gpu_kubernetes_attributes, tpu_kubernetes_attributes, tpu_slice,
                              tpu_worker_env)
from flaxchat.config import ConfigError, PipelineConfig, build_config
from flaxchat.distributed import detect_cluster


@pytest.mark.parametrize("type_, topology, chips, hosts, per_host, label", [
    ("v5e", "1x1", 1, 1, 1, "tpu-v5-lite-podslice"),
    ("v5litepod", "2x2", 4, 1, 4, "tpu-v5-lite-podslice"),
    ("v5e", "2x4", 8, 1, 8, "tpu-v5-lite-podslice"),     # the 8-chip host, ct5lp-hightpu-8t
    ("v5e", "4x4", 16, 4, 4, "tpu-v5-lite-podslice"),    # multi-host: 4-chip hosts, ct5lp-hightpu-4t
    ("v5e", "16x16", 256, 64, 4, "tpu-v5-lite-podslice"),
    ("v6e", "2x4", 8, 1, 8, "tpu-v6e-slice"),
    ("v6e", "8x8", 64, 16, 4, "tpu-v6e-slice"),
    ("v5p", "2x2x1", 4, 1, 4, "tpu-v5p-slice"),
    ("v5p", "2x2x2", 8, 2, 4, "tpu-v5p-slice"),
    ("v5p", "4x4x8", 128, 32, 4, "tpu-v5p-slice"),
    ("v4", "2x2x4", 16, 4, 4, "tpu-v4-podslice"),
])
def test_topology_gives_chips_hosts_and_the_node_label(type_, topology, chips, hosts, per_host, label):
    sl = tpu_slice(type_, topology)
    assert (sl.chips, sl.hosts, sl.chips_per_host, sl.type.accelerator) == (chips, hosts, per_host, label)
    assert sl.multi_host == (hosts > 1)


@pytest.mark.parametrize("type_, topology, needle", [
    ("v7x", "2x2", "unknown TPU type 'v7x'; choose one of v4, v5e, v5p, v6e"),
    ("v5e", "3x3", "choose one of 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16"),
    ("v6e", "2x2x1", "is not offered"),
    ("v5p", "4x4", "use AxBxC"),
    ("v5p", "2x4x8", "all <= 4 or all multiples of 4"),    # mixes a 2 with an 8
    ("v4", "1x1x1", "a multiple of 4 chips"),
    ("v4", "16x16x32", "at most 4096"),
])
def test_bad_tpu_input_is_one_line_naming_valid_values(type_, topology, needle):
    with pytest.raises(ComputeError, match=needle.replace("(", r"\(")) as err:
        tpu_slice(type_, topology)
    assert "\n" not in str(err.value)


def test_tpu_pod_spec_per_host():
    attrs = tpu_kubernetes_attributes(tpu_slice("v5e", "4x4"), image="reg/flaxchat:tpu", spot=True)
    assert attrs["node_selector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                      "cloud.google.com/gke-tpu-topology": "4x4",
                                      "cloud.google.com/gke-spot": "true"}
    assert attrs["extended_resources"] == {"google.com/tpu": "4"}      # chips per host, not per slice
    assert attrs["tolerations"] == [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert attrs["image"] == "reg/flaxchat:tpu"
    assert "gpu" not in attrs
    # pod size per host follows the chips on it: fits a 1-chip host, grows with 8-chip ones
    assert (attrs["cpu"], attrs["memory"]) == (32, 131072)
    one = tpu_kubernetes_attributes(tpu_slice("v5e", "1x1"))
    eight = tpu_kubernetes_attributes(tpu_slice("v6e", "2x4"), cpu=100)
    assert (one["cpu"], one["memory"], eight["cpu"], eight["memory"]) == (8, 32768, 100, 262144)


def test_gpu_pod_spec_and_its_errors():
    attrs = gpu_kubernetes_attributes("h100", 8, image="reg/flaxchat:gpu", cpu=10)
    assert (attrs["gpu"], attrs["gpu_vendor"], attrs["cpu"], attrs["memory"]) == (8, "nvidia", 10, 131072)
    assert attrs["shared_memory"] == 16384
    small = gpu_kubernetes_attributes("l4", 1)                  # fits a g2-standard-8
    assert (small["cpu"], small["memory"], small["shared_memory"]) == (4, 16384, 8192)
    assert attrs["node_selector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert attrs["tolerations"][0]["key"] == "nvidia.com/gpu"
    with pytest.raises(ComputeError, match="unknown GPU type 'h1000'; choose one of t4, l4"):
        gpu_kubernetes_attributes("h1000", 8)
    with pytest.raises(ComputeError, match="GPU count 3 .* choose one of 1, 2, 4, 8, 16"):
        gpu_kubernetes_attributes("l4", 3)


def test_default_compute_is_all_local_in_every_preset():
    for preset in ("demo", "tinystories", "climbmix", "speedrun"):
        placements = build_config(preset).compute.placements()
        assert {p.kind for p in placements.values()} == {"local"}, preset
        assert all(p.decorator is None for p in placements.values())


def test_compute_section_maps_each_stage_to_its_decorator():
    cfg = build_config("demo", overrides={"compute": {
        "tpu_image": "reg/flaxchat:tpu", "gpu_image": "reg/flaxchat:gpu",
        "pretrain": {"kind": "tpu", "type": "v6e", "topology": "4x4", "cpu": 100},
        "sft": {"kind": "tpu", "type": "v5e", "topology": "2x2", "image": "reg/other:tpu"},
        "eval": {"kind": "gpu", "type": "l4", "count": 1}}})
    p = cfg.compute.placements()
    assert (p["pretrain"].decorator, p["pretrain"].hosts) == ("tpu", 4)
    assert p["pretrain"].attributes == {"type": "v6e", "topology": "4x4", "spot": False, "cpu": 100,
                                        "image": "reg/flaxchat:tpu"}
    assert p["sft"].attributes["image"] == "reg/other:tpu"              # the stage's own image wins
    assert p["eval"].decorator == "kubernetes" and p["eval"].attributes["gpu"] == 1
    assert p["eval"].attributes["image"] == "reg/flaxchat:gpu"
    assert {s for s, x in p.items() if x.kind == "local"} == {"tokenizer", "grpo", "export"}
    assert PipelineConfig.from_dict(cfg.to_dict()).compute == cfg.compute   # manifests round-trip it


@pytest.mark.parametrize("section, needle", [
    ({"pretrian": {}}, "did you mean 'compute.pretrain'"),
    ({"pretrain": {"topolgy": "2x2"}}, "did you mean 'compute.pretrain.topology'"),
    ({"pretrain": {"kind": "cloud"}}, r"compute.pretrain.kind='cloud' is not one of \['local', 'tpu', 'gpu'\]"),
    ({"pretrain": {"kind": "tpu", "type": "v6e"}}, "compute.pretrain: a TPU stage needs type"),
    ({"pretrain": {"kind": "tpu", "type": "v6e", "topology": "3x3"}}, "compute.pretrain: TPU v6e topology '3x3'"),
    ({"sft": {"kind": "gpu", "type": "h100", "count": 8, "topology": "2x2"}}, "compute.sft.topology applies to TPUs"),
    ({"sft": {"kind": "tpu", "type": "v5e", "topology": "2x2", "count": 4}}, "compute.sft.count applies to GPUs"),
    ({"eval": {"topology": "2x2"}}, "compute.eval.topology is set but compute.eval.kind is local"),
    ({"export": {"cpu": 8}}, "compute.export.cpu is set but compute.export.kind is local"),
])
def test_bad_compute_config_names_the_key_and_the_fix(section, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config("demo", overrides={"compute": section})


def test_tpu_worker_env_for_a_four_host_slice():
    """What every pod of a v5e 4x4 JobSet derives: one worker id each, the same host list,
    node 0 first, in the order Metaflow numbers the nodes (worker job i is node i+1)."""
    domain = "js-abc.flaxchat.svc.cluster.local"
    base = {"MF_MASTER_ADDR": f"js-abc-control-0-0.{domain}", "MF_PARALLEL_NUM_NODES": "4",
            "MF_PARALLEL_MAIN_IP": "10.0.0.7"}
    expected_hosts = [f"js-abc-control-0-0.{domain}", f"js-abc-worker-0-0.{domain}",
                      f"js-abc-worker-1-0.{domain}", f"js-abc-worker-2-0.{domain}"]
    for node in range(4):
        env = {**base, "MF_PARALLEL_NODE_INDEX": str(node)}
        tpu = tpu_worker_env(env)
        assert tpu["TPU_WORKER_ID"] == str(node)
        assert tpu["TPU_WORKER_HOSTNAMES"].split(",") == expected_hosts
        # and flaxchat.distributed joins JAX's 4 processes through Metaflow's variables
        spec = detect_cluster({**env, **tpu})
        assert (spec.source, spec.coordinator, spec.num_processes, spec.process_id) == \
            ("metaflow", "10.0.0.7:8476", 4, node)


def test_tpu_worker_env_outside_a_jobset_and_bad_variables():
    assert tpu_worker_env({"MF_PARALLEL_NUM_NODES": "2", "MF_PARALLEL_NODE_INDEX": "0"}) == {}   # local @parallel
    with pytest.raises(ComputeError, match="does not look like Metaflow's JobSet control address"):
        tpu_worker_env({"MF_MASTER_ADDR": "10.0.0.7", "MF_PARALLEL_NUM_NODES": "2", "MF_PARALLEL_NODE_INDEX": "1"})
    with pytest.raises(ComputeError, match="outside"):
        tpu_worker_env({"MF_MASTER_ADDR": "j-control-0-0.j.ns.svc.cluster.local", "MF_PARALLEL_NUM_NODES": "2",
                        "MF_PARALLEL_NODE_INDEX": "2"})
