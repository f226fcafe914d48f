"""A minimal flow with one step on a multi-host TPU slice (v5e 4x4 = 4 hosts of 4 chips):
the shape Metaflow needs for a gang, probed offline by tests/test_tpu_decorator.py."""

from metaflow import FlowSpec, step, tpu


class TpuGangFlow(FlowSpec):

    @step
    def start(self):
        self.next(self.train, num_parallel=4)

    @tpu(type="v5e", topology="4x4", image="registry/flaxchat:tpu")
    @step
    def train(self):
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TpuGangFlow()
