"""Resolution of ``--strategy`` specs into Flower Message-API strategies."""

from strategies.resolve import (
    StrategyError,
    available_strategies,
    check_strategy_spec,
    resolve_strategy,
)

__all__ = ["StrategyError", "available_strategies", "check_strategy_spec", "resolve_strategy"]
