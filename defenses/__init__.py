"""Client-side defenses; importing this package registers every built-in one."""

from defenses import (
    adversarial,  # noqa: F401  (registers "adversarial")
    cem,  # noqa: F401  (registers "cem")
    dropout,  # noqa: F401  (registers "dropout")
    gradnoise,  # noqa: F401  (registers "gradnoise")
    infoscissors,  # noqa: F401  (registers "infoscissors")
    laplace,  # noqa: F401  (registers "laplace")
    mid,  # noqa: F401  (registers "mid")
    noise,  # noqa: F401  (registers "noise")
    nopeek,  # noqa: F401  (registers "nopeek")
    ppdl,  # noqa: F401  (registers "ppdl")
    topk,  # noqa: F401  (registers "topk")
)
from defenses.base import (
    FEDERATED_PREFIX,
    REGISTRY,
    Compose,
    Defense,
    DefenseError,
    build_defense,
    describe_registry,
    federated_arrays,
    load_arrays,
    local_arrays,
    register,
)

__all__ = ["FEDERATED_PREFIX", "REGISTRY", "Compose", "Defense", "DefenseError", "build_defense",
           "describe_registry", "federated_arrays", "load_arrays", "local_arrays", "register"]
