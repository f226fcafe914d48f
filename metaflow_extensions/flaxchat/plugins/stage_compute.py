"""@stage_compute(): put each pipeline step where the config's `compute` section says.

    @stage_compute()                      # reads the Config named "config" (the overrides YAML)
    class FullPipelineFlow(FlowSpec):
        overrides = Config("config", default_value={}, parser=yaml.safe_load)

Metaflow fixes a step's decorators before any step runs, so placement cannot come from the
`start` step's resolved config. Metaflow 2.19's answer is a FlowMutator: its `pre_mutate`
runs once the Config values are parsed and may add decorators to steps, in the launching
process and again, identically, in every task process and pod (the Config value travels with
the run). So the placement is exactly the `compute` section of the `--config` file on top of
the defaults (everything local); presets and Parameters cannot move a stage.

A stage set to `tpu` gets `@tpu(type, topology, ...)` (which brings @kubernetes and, for a
multi-host slice, @parallel); `gpu` gets `@kubernetes(gpu=N, ...)` on one GPU node; `local`
gets nothing, so `--with kubernetes` or a plain local run behaves as before.
"""

from metaflow.exception import MetaflowException
from metaflow.user_decorators.mutable_step import MutableStep
from metaflow.user_decorators.user_flow_decorator import FlowMutator


class ComputeConfigError(MetaflowException):
    headline = "flaxchat: bad compute config"


def compute_placements(overrides) -> dict:
    """{stage: flaxchat.compute.Placement} from a mapping of config overrides (its `compute`
    section; the rest is the start step's business)."""
    from flaxchat.config import ComputeConfig, ConfigError, apply_overrides
    section = ComputeConfig()
    try:
        apply_overrides(section, dict((overrides or {}).get("compute") or {}), prefix="compute.")
        return section.placements()
    except ConfigError as exc:
        raise ComputeConfigError(f"{type(exc).__name__}: {exc}") from None


class stage_compute(FlowMutator):
    """Attach @tpu / @kubernetes to the steps named after stages, from the Config `config_name`."""

    def init(self, config_name: str = "config"):
        self.config_name = config_name

    def pre_mutate(self, mutable_flow):
        values = dict(mutable_flow.configs)
        if self.config_name not in values:
            raise ComputeConfigError(f"@stage_compute: the flow has no Config named {self.config_name!r}; "
                                     f"it has {sorted(values) or 'none'}")
        placements = compute_placements(values[self.config_name])
        steps = dict(mutable_flow.steps)
        for stage, where in placements.items():
            if where.decorator is None:
                continue
            if stage not in steps:
                raise ComputeConfigError(f"compute.{stage} is set but the flow has no step named {stage}")
            if where.hosts > 1:
                # a multi-host @tpu is itself the step's @parallel decorator: the flow's own gives way
                steps[stage].remove_decorator("parallel")
            # OVERRIDE: a step decorator written in the flow for the same purpose gives way to the config
            steps[stage].add_decorator(where.decorator, deco_kwargs=dict(where.attributes),
                                       duplicates=MutableStep.OVERRIDE)
