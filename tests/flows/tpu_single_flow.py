"""@tpu next to a @kubernetes written in the flow (a single-host v6e 2x2 slice), and a
multi-host slice on a step that is not wired as a gang: probed by tests/test_tpu_decorator.py."""

from metaflow import FlowSpec, Config, kubernetes, step, tpu


class TpuSingleFlow(FlowSpec):
    cfg = Config("cfg", default_value={"topology": "2x2"})

    @kubernetes(cpu=64, memory=8192, node_selector="team=ml", tolerations=[{"key": "team", "operator": "Exists"}])
    @tpu(type="v6e", topology="2x2")
    @step
    def start(self):
        self.next(self.train)

    @tpu(type="v6e", topology=cfg.topology)
    @step
    def train(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TpuSingleFlow()
