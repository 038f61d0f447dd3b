"""Client-side defenses; importing this package registers every built-in one."""

from defenses import noise  # noqa: F401  (registers "noise")
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
