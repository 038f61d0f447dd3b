"""Unit behaviour of the pieces the simulator is built from: split maths, view, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacks.completion import MaliciousOptimizer
from sim.checkpoint import RoundShards
from sim.cloud import CloudSession, average_states, make_optimizer
from sim.config import ConfigError, GroupConfig, SimConfig, config_from_dict, load_config, validate
from sim.models import SplitSpec, build_head, build_tail
from sim.spec import SpecError, parse_call, parse_chain
from sim.view import ClientView, FeatureStore, Reservoir, load_view


def test_split_gradient_equals_end_to_end_gradient():
    """The cloud's dL/dz, pushed through the head, gives exactly the unsplit model's gradient."""
    torch.manual_seed(0)
    spec = SplitSpec("small", (1, 28, 28), 10)
    head, tail = build_head(spec), build_tail(spec)
    for module in tail.modules():  # no dropout, so both passes compute the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    F.cross_entropy(tail(head(x)), y).backward()
    expected = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    session = CloudSession(tail, torch.optim.SGD(tail.parameters(), lr=0.0), Reservoir(4, 0))
    z = head(x)
    grad, loss, _ = session.train_batch(np.arange(16), z.detach().numpy(), y.numpy())
    (z * torch.from_numpy(grad)).sum().backward()
    for got, want in zip((p.grad for p in head.parameters()), expected):
        torch.testing.assert_close(got, want)
    assert session.bytes_received == z.numel() * 4 + 16 * 8 and session.bytes_sent == z.numel() * 4


def test_ushaped_exchange_equals_end_to_end_gradient():
    """U-shaped: h from the cloud, the loss on the client's last layer, dL/dh back, dL/dz in
    return give exactly the unsplit model's gradients, and the cloud never receives a label."""
    torch.manual_seed(0)
    spec = SplitSpec("small", (1, 28, 28), 10)
    head, full = build_head(spec), build_tail(spec)
    for module in full.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    F.cross_entropy(full(head(x)), y).backward()
    expected = [p.grad.clone() for p in [*head.parameters(), *full.parameters()]]
    head.zero_grad()
    tail, last = full[:-1], full[-1]  # the U-shaped tail and the client's last layer
    assert len(build_tail(SplitSpec("small", (1, 28, 28), 10, split="ushaped"))) == len(tail)
    full.zero_grad()
    session = CloudSession(tail, torch.optim.SGD(tail.parameters(), lr=0.0), Reservoir(4, 0))
    z = head(x)
    h = torch.from_numpy(session.forward(np.arange(16), z.detach().numpy())).requires_grad_(True)
    F.cross_entropy(last(h), y).backward()
    grad = session.backward(h.grad.numpy())
    (z * torch.from_numpy(grad)).sum().backward()
    for got, want in zip([p.grad for p in [*head.parameters(), *full.parameters()]], expected):
        torch.testing.assert_close(got, want)
    assert session.bytes_received == z.numel() * 4 + h.numel() * 4  # z and dL/dh: no labels
    assert session.bytes_sent == h.numel() * 4 + z.numel() * 4


def test_malicious_optimizer_scales_the_update():
    """MaliciousSGD over plain SGD: the first step is honest, later ones scale each entry's
    update by clamp(1 + g_t / g_{t-1}, 1, 5)."""
    w = torch.nn.Parameter(torch.zeros(4))
    opt = MaliciousOptimizer(torch.optim.SGD([w], lr=1.0))
    for grad, expected in (([1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]),
                           ([2.0, -1.0, 0.5, 10.0], [-2.0 * 3, 1.0 * 1, -0.5 * 1.5, -10.0 * 5])):
        before = w.detach().clone()
        w.grad = torch.tensor(grad)
        opt.step()
        torch.testing.assert_close(w.detach() - before, torch.tensor(expected))


def test_session_trains_the_tail_and_records_features():
    torch.manual_seed(0)
    spec = SplitSpec("small", (1, 28, 28), 10)
    tail = build_tail(spec)
    before = [p.detach().clone() for p in tail.parameters()]
    session = CloudSession(tail, make_optimizer(tail.parameters(), 1e-3), Reservoir(8, 0))
    z = np.random.default_rng(0).random((5, 8, 7, 7), dtype=np.float32)
    session.train_batch(np.arange(100, 105), z, np.arange(5))
    assert any(not torch.equal(a, b) for a, b in zip(before, tail.parameters()))
    view = session.view(3, 0, 4, 1, (8, 7, 7))
    assert view.sample_ids.tolist() == [100, 101, 102, 103, 104]
    np.testing.assert_array_equal(view.features, z)


def test_reservoir_is_bounded_uniform_and_seeded():
    counts = np.zeros(1000)
    for seed in range(300):
        r = Reservoir(50, seed)
        for start in range(0, 1000, 64):
            ids = np.arange(start, min(start + 64, 1000))
            r.add(ids, np.zeros((len(ids), 2), np.float32))
        assert len(r.ids) == 50 and r.seen == 1000 and len(set(r.ids)) == 50
        counts[r.ids] += 1
    # Each id is kept with probability 50/1000: 15 of 300 draws on average, early and late alike.
    assert abs(counts[:500].mean() - 15) < 1.5 and abs(counts[500:].mean() - 15) < 1.5
    a, b = Reservoir(10, 7), Reservoir(10, 7)
    for r in (a, b):
        r.add(np.arange(100), np.zeros((100, 1), np.float32))
    assert a.ids == b.ids


def test_feature_store_keeps_latest_round_adds_bytes_and_round_trips(tmp_path):
    store = FeatureStore(tmp_path / "shards")
    feats = lambda n, hw: np.ones((n, 8, hw, hw), np.float32)  # noqa: E731
    store.put(ClientView(0, 0, 4, 1, np.array([1, 2]), feats(2, 7), 2, 10, 5))
    store.put(ClientView(0, 0, 4, 2, np.array([3]), feats(1, 7), 1, 10, 5))
    store.put(ClientView(1, 1, 2, 2, np.array([4, 5, 6]), feats(3, 14), 3, 1, 1))
    assert store.get(0).round == 2 and store.get(0).bytes_received == 20
    store.save(str(tmp_path / "v.npz"))
    view = load_view(str(tmp_path / "v.npz"))
    assert sorted(view) == [2, 4]
    assert view[4]["sample_ids"].tolist() == [3] and view[4]["rounds"].tolist() == [2]
    assert view[2]["features"].shape == (3, 8, 14, 14) and view[2]["group_ids"].tolist() == [1, 1, 1]
    # on disk after a flush, the same view from the shard; back from the checkpoint state alone
    assert store.flush(2) > 0 and list((tmp_path / "shards").iterdir()) == [tmp_path / "shards" / "r00002.npz"]
    back = FeatureStore(tmp_path / "shards")
    back.load_state(store.state())
    back.save(str(tmp_path / "back.npz"))
    again = load_view(str(tmp_path / "back.npz"))
    for cut in view:
        for name in view[cut]:
            np.testing.assert_array_equal(again[cut][name], view[cut][name])


def test_round_shards_keep_only_what_changed_and_prune_what_no_index_points_to(tmp_path):
    shards = RoundShards(tmp_path)
    shards.put("a", {"x": np.arange(3)})
    shards.put("b", {"x": np.arange(4)})
    first = shards.flush(1)
    shards.put("a", {"x": np.arange(5)})
    assert 0 < shards.flush(2) < first  # round 2 writes a's new arrays only
    assert shards.get("a")["x"].tolist() == list(range(5)) and shards.get("b")["x"].tolist() == list(range(4))
    shards.put("b", {"x": np.zeros(1)})
    shards.flush(3)
    shards.prune()  # round 1's shard holds nothing current any more
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r00002.npz", "r00003.npz"]
    with pytest.raises(RuntimeError, match="not flushed"):
        shards.put("c", {"x": np.zeros(1)})
        shards.state()


def test_average_states_is_weighted():
    a, b = {"w": np.array([0.0, 2.0])}, {"w": np.array([4.0, 6.0])}
    np.testing.assert_allclose(average_states([a, b], [3, 1])["w"], [1.0, 3.0])


@pytest.mark.parametrize("arch,shape,z", [("small", (1, 28, 28), (8, 7, 7)), ("vgg11_bn", (3, 32, 32), (8, 8, 8))])
def test_models_split_where_the_papers_do(arch, shape, z):
    spec = SplitSpec(arch, shape, 10)
    spec.validate()
    out = build_head(spec)(torch.rand(2, *shape))
    assert out.shape[1:] == z == spec.feature_shape
    assert out.min() >= 0 and out.max() <= 1  # the Sigmoid bounds z, so noise levels mean something
    assert build_tail(spec)(out).shape == (2, 10)
    with pytest.raises(ValueError):
        SplitSpec(arch, shape, 10, cut=99).validate()


def test_groups_inherit_and_divide_the_clients():
    cfg = SimConfig(clients=10, defense="noise(sigma=0.1)", epochs=2,
                    groups=[GroupConfig(name="a", share=0.3), GroupConfig(share=0.7, defense="none", cut=2)])
    validate(cfg)
    a, b = cfg.resolved_groups()
    assert (a.defense, a.cut, a.epochs) == ("noise(sigma=0.1)", 4, 2)
    assert (b.name, b.defense, b.cut) == ("group1", "none", 2)
    assert cfg.group_sizes() == [3, 7] and cfg.group_of() == [0] * 3 + [1] * 7
    assert config_from_dict(cfg.to_dict()) == cfg


def test_cli_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("clients: 7\nrounds: 4\ngroups:\n  - share: 1.0\n    epochs: 3\n")
    cfg = load_config(str(path), {"rounds": 2})
    assert (cfg.clients, cfg.rounds, cfg.resolved_groups()[0].epochs) == (7, 2, 3)
    with pytest.raises(ConfigError, match="groups"):
        validate(SimConfig(groups=[GroupConfig(share=0.5)]))


def test_spec_parser():
    assert [s.name for s in parse_chain("dropout(p=0.2)+noise(sigma=0.01)+cem")] == ["dropout", "noise", "cem"]
    wrapped = parse_call("DifferentialPrivacyServerSideFixedClipping(FedAvg(), noise_multiplier=0.1)")
    assert wrapped.args[0].name == "FedAvg" and wrapped.kwargs == {"noise_multiplier": 0.1}
    assert parse_call("pkg.mod:Cls(a=[1, 2])").kwargs == {"a": [1, 2]}
    for bad in ("noise(sigma=", "1x", "noise(**k)", "noise(sigma=__import__)"):
        with pytest.raises(SpecError):
            parse_call(bad)
