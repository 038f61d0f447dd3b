"""Client-side defenses; importing this package registers every built-in one."""

from defenses import noise  # noqa: F401  (registers "noise")
from defenses.base import (
    REGISTRY,
    Compose,
    Defense,
    DefenseError,
    build_defense,
    describe_registry,
    register,
)

__all__ = ["REGISTRY", "Compose", "Defense", "DefenseError", "build_defense",
           "describe_registry", "register"]
