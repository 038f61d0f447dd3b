"""Client-side defenses; importing this package registers every built-in one."""

from defenses import noise  # noqa: F401  (registers "noise")
from defenses import dropout  # noqa: F401  (registers "dropout")
from defenses import topk  # noqa: F401  (registers "topk")
from defenses import laplace  # noqa: F401  (registers "laplace")
from defenses import nopeek  # noqa: F401  (registers "nopeek")
from defenses import mid  # noqa: F401  (registers "mid")
from defenses import ppdl  # noqa: F401  (registers "ppdl")
from defenses import cem  # noqa: F401  (registers "cem")
from defenses import adversarial  # noqa: F401  (registers "adversarial")
from defenses import infoscissors  # noqa: F401  (registers "infoscissors")
from defenses import gradnoise  # noqa: F401  (registers "gradnoise")
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
