"""Strategy spec resolution and the example user strategy, without Ray or a Flower run."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedXgbCyclic,
    Krum,
    QFedAvg,
)
from flwr.supercore.task_identity import TaskIdentity

from examples.custom_strategy import NormClippedFedAvg, clip_and_average
from sim.server_app import exchange
from strategies import StrategyError, available_strategies, check_strategy_spec, resolve_strategy

SIM_DEFAULTS = {
    "fraction_train": 0.1,
    "fraction_evaluate": 0.0,
    "min_train_nodes": 1,
    "min_available_nodes": 1,
}
DP_FEDAVG = (
    "DifferentialPrivacyServerSideFixedClipping(FedAvg(), noise_multiplier=0.1, "
    "clipping_norm=10.0, num_sampled_clients=5)"
)
CUSTOM = "examples.custom_strategy:NormClippedFedAvg(max_norm=5.0)"


# --- resolution ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "cls"),
    [
        ("FedAvg", FedAvg),
        ("FedAvg()", FedAvg),
        ("FedProx(proximal_mu=0.1)", FedProx),
        ("FedMedian", FedMedian),
        ("FedTrimmedAvg(beta=0.2)", FedTrimmedAvg),
        ("Krum(num_malicious_nodes=1)", Krum),
        ("QFedAvg(client_learning_rate=0.1)", QFedAvg),
        (DP_FEDAVG, DifferentialPrivacyServerSideFixedClipping),
        (CUSTOM, NormClippedFedAvg),
    ],
)
def test_resolves_to_the_named_class(spec: str, cls: type) -> None:
    strategy = resolve_strategy(spec, SIM_DEFAULTS)
    assert type(strategy) is cls
    assert check_strategy_spec(spec) is None


def test_keyword_values_reach_the_strategy() -> None:
    assert resolve_strategy("FedProx(proximal_mu=0.1)").proximal_mu == 0.1
    assert resolve_strategy("FedTrimmedAvg(beta=0.3)").beta == 0.3
    assert resolve_strategy("Krum(num_malicious_nodes=1)").num_malicious_nodes == 1
    assert resolve_strategy(CUSTOM).max_norm == 5.0


def test_wrapper_holds_the_inner_strategy_and_only_it_gets_defaults() -> None:
    dp = resolve_strategy(DP_FEDAVG, SIM_DEFAULTS)
    assert isinstance(dp, DifferentialPrivacyServerSideFixedClipping)
    assert type(dp.strategy) is FedAvg
    assert dp.strategy.fraction_train == 0.1
    assert dp.strategy.min_available_nodes == 1
    assert (dp.noise_multiplier, dp.clipping_norm, dp.num_sampled_clients) == (0.1, 10.0, 5)


def test_wrapper_arguments_may_be_positional() -> None:
    dp = resolve_strategy(
        "DifferentialPrivacyServerSideFixedClipping(FedProx(proximal_mu=0.2), 0.5, 2.0, 3)"
    )
    assert isinstance(dp.strategy, FedProx) and dp.strategy.proximal_mu == 0.2
    assert (dp.noise_multiplier, dp.clipping_norm, dp.num_sampled_clients) == (0.5, 2.0, 3)


def test_defaults_fill_unset_arguments() -> None:
    strategy = resolve_strategy("FedAvg", SIM_DEFAULTS)
    assert strategy.fraction_train == 0.1
    assert strategy.fraction_evaluate == 0.0
    assert strategy.min_train_nodes == 1
    assert strategy.min_available_nodes == 1


def test_user_arguments_win_over_defaults() -> None:
    strategy = resolve_strategy("FedProx(proximal_mu=0.1, min_train_nodes=3)", SIM_DEFAULTS)
    assert strategy.min_train_nodes == 3
    assert strategy.fraction_train == 0.1


def test_defaults_skip_classes_that_do_not_accept_them() -> None:
    # FedXgbCyclic has no min_train_nodes; passing it would be a TypeError.
    strategy = resolve_strategy("FedXgbCyclic", {"min_train_nodes": 1, "min_available_nodes": 1})
    assert isinstance(strategy, FedXgbCyclic)
    assert strategy.min_available_nodes == 1


def test_defaults_follow_kwargs_forwarding_of_user_classes() -> None:
    # NormClippedFedAvg takes **kwargs and forwards them to FedAvg.
    strategy = resolve_strategy(CUSTOM, SIM_DEFAULTS)
    assert strategy.fraction_train == 0.1 and strategy.min_available_nodes == 1


def test_without_defaults_the_class_defaults_stay() -> None:
    assert resolve_strategy("FedAvg").fraction_train == FedAvg().fraction_train


def test_available_lists_concrete_flower_strategies_only() -> None:
    names = available_strategies()
    assert {"FedAvg", "FedProx", "Krum", "DifferentialPrivacyServerSideFixedClipping"} <= set(names)
    assert "Strategy" not in names and "Result" not in names


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nosuch", ["unknown strategy 'nosuch'", "FedAvg", "FedProx", "path.to.module:Class"]),
        ("fedavg", ["did you mean 'FedAvg'?"]),
        ("examples.custom_strategy.NormClippedFedAvg", ["examples.custom_strategy:NormClip"]),
        ("nosuch.module:X", ["cannot import module 'nosuch.module'", "No module named"]),
        ("examples.custom_strategy:Nope", ["no attribute 'Nope'", "NormClippedFedAvg"]),
        ("FedAvg(nosuchkw=1)", ["no argument(s) nosuchkw", "accepted:", "fraction_train"]),
        (CUSTOM[:-1] + ", nosuchkw=1)", ["nosuchkw", "max_norm", "fraction_train"]),
        ("os:getcwd", ["'os:getcwd'", "subclass of flwr.serverapp.strategy.Strategy"]),
        ("sim.spec:CallSpec", ["is a class", "subclass of flwr.serverapp.strategy.Strategy"]),
        ("FedProx(proximal_mu='abc')", ["proximal_mu='abc'", "float"]),
        ("FedTrimmedAvg(beta=0.7)", ["rejected its arguments", "beta"]),
        (
            "DifferentialPrivacyServerSideFixedClipping(FedAvg())",
            ["missing required", "noise_multiplier", "clipping_norm", "num_sampled_clients"],
        ),
        (DP_FEDAVG.replace("FedAvg()", "nosuch()"), ["unknown strategy 'nosuch'"]),
        (DP_FEDAVG.replace("=5", "=5.5"), ["num_sampled_clients=5.5", "int"]),
        ("DifferentialPrivacyServerSideFixedClipping('FedAvg', 0.1, 1.0, 2)", ["Strategy"]),
        ("QFedAvg", ["missing required", "client_learning_rate"]),
        ("FedAvg(0.5, fraction_train=0.5)", ["fraction_train twice"]),
        ("examples.custom_strategy:NormClippedFedAvg(max_norm=-1)", ["max_norm must be positive"]),
        ("FedAvg(", ["invalid strategy spec"]),
        ("FedAvg(x=os.system)", ["invalid strategy spec", "not a literal"]),
        ("", ["invalid strategy spec", "empty"]),
    ],
)
def test_bad_specs_give_one_helpful_line(spec: str, expected: list[str]) -> None:
    with pytest.raises(StrategyError) as info:
        check_strategy_spec(spec)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_strategy_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        resolve_strategy("nosuch")


def test_rejected_defaults_are_named_in_the_error() -> None:
    with pytest.raises(StrategyError, match="simulator's defaults fraction_train=0.1"):
        resolve_strategy("FedXgbCyclic", {"fraction_train": 0.1})
    with pytest.raises(StrategyError, match="simulator's defaults fraction_train=0.1"):
        check_strategy_spec("FedXgbCyclic", {"fraction_train": 0.1})
    check_strategy_spec("FedXgbCyclic", {"fraction_train": 1.0})


def test_check_is_quiet_and_restores_logging() -> None:
    logger = logging.getLogger("flwr")
    before = logger.disabled
    check_strategy_spec("FedAvg(fraction_evaluate=0.0)")
    with pytest.raises(StrategyError):
        check_strategy_spec("nosuch")
    assert logger.disabled == before


# --- the example strategy's aggregation -----------------------------------------------------


def _record(**arrays: list[float]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def test_clip_and_average_clips_only_large_updates() -> None:
    start = _record(w=[1.0, 1.0], b=[0.0])
    small = _record(w=[4.0, 5.0], b=[0.0])  # update norm 5: kept as is
    large = _record(w=[1.0, 1.0], b=[20.0])  # update norm 20: scaled to 5
    averaged, clipped = clip_and_average(start, [small, large], [1.0, 1.0], max_norm=5.0)
    result = _numpy(averaged)
    np.testing.assert_allclose(result["w"], [2.5, 3.0])
    np.testing.assert_allclose(result["b"], [2.5])
    assert result["w"].dtype == np.float32
    assert clipped == 0.5


def test_clip_and_average_weights_clients_and_equals_fedavg_without_clipping() -> None:
    start = _record(w=[0.0])
    clients = [_record(w=[1.0]), _record(w=[4.0])]
    averaged, clipped = clip_and_average(start, clients, [3.0, 1.0], max_norm=100.0)
    np.testing.assert_allclose(_numpy(averaged)["w"], [1.75])
    assert clipped == 0.0


def test_clip_and_average_uses_the_norm_of_the_whole_model() -> None:
    start = _record(a=[0.0], b=[0.0])
    client = _record(a=[3.0], b=[4.0])  # each layer below 5, together norm 5 -> max 2.5 clips
    averaged, clipped = clip_and_average(start, [client], [1.0], max_norm=2.5)
    np.testing.assert_allclose(_numpy(averaged)["a"], [1.5])
    np.testing.assert_allclose(_numpy(averaged)["b"], [2.0])
    assert clipped == 1.0


def test_clip_and_average_keeps_torch_state_dict_keys_and_dtypes() -> None:
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    start = ArrayRecord(head.state_dict())
    moved = {k: v + 10.0 if v.is_floating_point() else v for k, v in head.state_dict().items()}
    averaged, clipped = clip_and_average(start, [ArrayRecord(moved)], [1.0], max_norm=1.0)
    state = averaged.to_torch_state_dict()
    assert list(state) == list(head.state_dict())
    assert state["1.num_batches_tracked"].dtype == torch.int64
    delta = torch.cat(
        [(state[k] - v).flatten() for k, v in head.state_dict().items() if v.is_floating_point()]
    )
    assert torch.linalg.vector_norm(delta).item() == pytest.approx(1.0, rel=1e-5)
    assert clipped == 1.0


class _Grid:
    """Just what FedAvg.configure_train asks of a Grid: the connected node ids."""

    def get_node_ids(self) -> list[int]:
        return [11, 12]


def _reply(instruction: Message, arrays: ArrayRecord, examples: int, loss: float) -> Message:
    metrics = MetricRecord({"num-examples": examples, "loss": loss})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=instruction)


@pytest.mark.usefixtures("task_identity")
def test_norm_clipped_fedavg_round_trip() -> None:
    strategy = resolve_strategy("examples.custom_strategy:NormClippedFedAvg(max_norm=1.0)")
    start = _record(w=[0.0, 0.0])
    instructions = list(strategy.configure_train(1, start, ConfigRecord(), _Grid()))
    assert sorted(m.metadata.dst_node_id for m in instructions) == [11, 12]
    replies = [
        _reply(instructions[0], _record(w=[0.3, 0.4]), examples=1, loss=1.0),  # norm 0.5
        _reply(instructions[1], _record(w=[30.0, 40.0]), examples=1, loss=3.0),  # norm 50
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(_numpy(arrays)["w"], [0.45, 0.6], rtol=1e-6)
    assert metrics["clipped-fraction"] == 0.5
    assert metrics["loss"] == pytest.approx(2.0)
    plain, _ = FedAvg().aggregate_train(1, replies)
    np.testing.assert_allclose(_numpy(plain)["w"], [15.15, 20.2], rtol=1e-6)


def test_norm_clipped_fedavg_needs_configure_train_first() -> None:
    with pytest.raises(RuntimeError, match="before configure_train"):
        NormClippedFedAvg(max_norm=1.0).aggregate_train(1, [])


# --- building Messages outside a Flower run --------------------------------------------------


def test_messages_outside_a_run_need_explicit_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", None)
    content = RecordDict({"arrays": _record(w=[1.0]), "metrics": MetricRecord({"num-examples": 2})})
    with pytest.raises(RuntimeError, match="run_id is not set"):
        Message(content, dst_node_id=3, message_type=MessageType.TRAIN)
    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=3,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    reply = Message(content, metadata=metadata)
    arrays, _ = FedAvg().aggregate_train(1, [reply])
    np.testing.assert_allclose(_numpy(arrays)["w"], [1.0])


# --- the server's exchange of messages --------------------------------------------------------


class _SlowNodes:
    """A Grid whose nodes answer one after another, ``gap`` seconds apart (as 10,000 simulated
    nodes do on 2 cores, only faster)."""

    def __init__(self, gap: float) -> None:
        self.gap = gap
        self.pushed: list[Message] = []
        self.start = 0.0

    def push_messages(self, messages: list[Message]) -> list[str]:
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"  # as Flower's InMemoryGrid sets it
        self.pushed, self.start = list(messages), time.monotonic()
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        due = int((time.monotonic() - self.start) / self.gap)
        return [Message(RecordDict({}), reply_to=m) for m in self.pushed[:due] if m.metadata.message_id in ids]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("idle", [False, True])
def test_exchange_with_idle_waits_while_replies_keep_coming(idle: bool) -> None:
    messages = [Message(RecordDict({}), dst_node_id=node, message_type="query") for node in range(20)]
    replies = exchange(_SlowNodes(gap=0.05), messages, 0.4, lambda _: None, idle=idle)
    # 20 replies take 1 s: a fixed 0.4 s deadline cuts them short, one counted from the last reply does not
    assert (len(replies) == 20) == idle, len(replies)
