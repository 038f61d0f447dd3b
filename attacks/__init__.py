"""The adversary: what the curious cloud records, and the attacks it runs on it."""

from attacks import completion, decoder, fora, fsha, gan, gradlabel, ka, rmle, sdar  # noqa: F401,E402  (register the attacks)
from attacks.base import (  # noqa: E402
    ATTACKS,
    LEVELS,
    Attack,
    AttackError,
    Knowledge,
    build_attack,
    register,
)
from attacks.scoring import Scorer  # noqa: E402

__all__ = ["ATTACKS", "LEVELS", "Attack", "AttackError", "Knowledge", "Scorer", "build_attack",
           "register"]
