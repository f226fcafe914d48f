"""flaxchat's optimizer: a faithful optax port of nanochat's MuonAdamW.

- muon.py       the Muon step (Nesterov, MuonEq, Polar Express, Muon+, NorMuon, cautious WD)
- adamw.py      nanochat's fused AdamW step
- schedules.py  LR multiplier, Muon momentum and Muon weight-decay schedules from the step counter
- groups.py     param -> group rules, the combined transformation and `build_optimizer`
- scaling.py    depth scaling: horizon, batch size, LR and WD scaled from the d12 reference
"""

from flaxchat.optim.groups import (AdamWGroup, MuonAdamWState, MuonGroup, ParamGroupError, build_optimizer,
                                   group_assignment, group_for, muon_adamw, nanochat_groups, param_path)
from flaxchat.optim.muon import muon_lr_scale, polar_express, second_moment_axis, second_moment_shape
from flaxchat.optim.scaling import (B_REF, ScalingError, TrainingPlan, num_scaling_params, param_counts,
                                    plan_training)
from flaxchat.optim.schedules import ScheduleConfig, lr_multiplier, muon_momentum, weight_decay_multiplier

__all__ = [
    "AdamWGroup", "B_REF", "MuonAdamWState", "MuonGroup", "ParamGroupError", "ScalingError", "ScheduleConfig",
    "TrainingPlan", "build_optimizer", "group_assignment", "group_for", "lr_multiplier", "muon_adamw",
    "muon_lr_scale", "muon_momentum", "nanochat_groups", "num_scaling_params", "param_counts", "param_path",
    "plan_training", "polar_express", "second_moment_axis", "second_moment_shape", "weight_decay_multiplier",
]
