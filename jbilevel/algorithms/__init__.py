"""Training methods: offline BDS (implicit), BMO (penalty) and the uniform baselines."""

from jbilevel.algorithms.offline import (
    METHODS,
    MethodConfig,
    Steps,
    TrainState,
    init_state,
    lambda_at,
    make_steps,
)

__all__ = [
    "METHODS",
    "MethodConfig",
    "Steps",
    "TrainState",
    "init_state",
    "lambda_at",
    "make_steps",
]
