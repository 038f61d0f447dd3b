"""Bad input gets one line saying what and where, exit code 2, no traceback, no run directory.

The project's habit, checked case by case: CLI flags, YAML files, defense, strategy and attack
specs, data roots with damaged files, output places that cannot be written, values that point
outside the process. Each case asserts exit code 2, exactly one non-empty stderr line starting
with ``error:``, a distinctive substring naming the flag, field or file to fix, and that the
``--out`` folder was not created. Most cases call ``sim.run.main`` in-process (milliseconds
each); a few go through a real ``python -m sim.run`` to prove no traceback reaches the shell.

Runs that cannot go on: ``--resume`` with a missing, corrupt or mismatched checkpoint (exit 2,
the run's folder untouched), and a NaN loss from a huge learning rate, found during the run
(exit 1, the checkpoint kept so the run can be resumed with a saner setting).
"""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import sim.experiment
from sim.config import SimConfig, load_config, validate
from sim.data import load_dataset
from sim.run import main
from tests.simhelpers import run_cli

# Builds a case's arguments: given tmp_path, it may create files there and returns the flags.
Args = Callable[[Path], list[str]]


def run_main(capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> tuple[int, str]:
    """``sim.run.main`` in-process (fast); argparse's own errors exit through SystemExit."""
    try:
        rc = main(["--out", str(out), *args])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def assert_one_clean_line(rc: int, err: str, expected: str, out: Path) -> str:
    """Exit 2, exactly one ``error:`` line containing ``expected``, and no ``out`` folder."""
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.is_dir(), f"{out} was created"
    return lines[0]


@pytest.fixture(autouse=True)
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A case that stops being rejected must fail here at once, not start Ray inside pytest.

    Only the simulator's own entry point is replaced; validation, data loading and the run
    directory are the real code.
    """
    def refuse(*_: object) -> None:
        raise AssertionError("the bad input passed validation and a simulation was about to start")

    monkeypatch.setattr(sim.experiment, "simulate", refuse)


# ------------------------------------------------------------------------------ CLI flags

FLAGS: dict[str, tuple[list[str], str]] = {
    # types, missing values and unknown flags (argparse, through the one-line parser)
    "not a number": (["--rounds", "two"], "--rounds"),
    "float for an int": (["--clients", "2.5"], "argument --clients: invalid int value: '2.5'"),
    "flag without its value": (["--clients"], "argument --clients: expected one argument"),
    "unknown flag": (["--nosuch-flag", "1"], "nosuch-flag"),
    # ranges
    "zero clients": (["--clients", "0"], "clients"),
    "negative rounds": (["--rounds", "-1"], "--rounds: must be at least 1, got -1"),
    "bad fraction": (["--fraction", "1.5"], "fraction"),
    "NaN learning rate": (["--lr", "nan"], "--lr: must be a finite number, got nan"),
    "failure rate of 1": (["--client-failure-rate", "1", "--round-timeout", "5"],
                          "--client-failure-rate: must be in [0, 1), got 1.0"),
    "failure rate without a timeout": (["--client-failure-rate", "0.2"], "needs --round-timeout"),
    "infinite client CPUs": (["--client-cpus", "inf"], "--client-cpus: must be a finite number"),
    "negative seed": (["--seed", "-1"], "--seed: must be in 0..4294967295, got -1"),
    "holdout of everything": (["--holdout", "1"], "--holdout: must be in [0, 1)"),
    "zero batch size": (["--batch-size", "0"], "--batch-size: must be at least 1"),
    "empty out": (["--out", ""], "--out: must name a folder"),
    # unknown choices
    "bad protocol": (["--protocol", "sflv3"], "protocol"),
    "unknown split": (["--split", "vshaped"], "split: 'vshaped' unknown"),
    "unknown adversary": (["--adversary", "evil"], "adversary"),
    "unknown dataset": (["--dataset", "imagenet"], "--dataset: 'imagenet' unknown"),
    "unknown partition": (["--partition", "zipf"], "--partition: 'zipf' unknown"),
    "unknown arch": (["--arch", "resnet"], "--arch: 'resnet' unknown"),
    "unknown attacker knowledge": (["--attacker-knowledge", "god"], "--attacker-knowledge: 'god' unknown"),
    # values that only the data can refute
    "cut out of range": (["--cut", "9"], "cut"),
    "arch too big for the images": (["--arch", "vgg11_bn"], "--arch: vgg11_bn needs inputs of at least 32"),
    "more clients than samples": (["--clients", "100", "--train-subset", "50"], "clients"),
    "impossible partition": (["--partition", "dirichlet", "--clients", "2", "--train-subset", "2"],
                             "--partition: dirichlet(num_partitions=2, alpha=0.5): flwr_datasets could not"),
    "more classes per client than labels": (["--partition", "pathological", "--classes-per-client", "20"],
                                            "partition: pathological(num_partitions=10, classes_per_partition=20)"),
    "auxiliary split of everything": (["--aux-fraction", "0.99999"], "--aux-fraction: aux_fraction=0.99999 of 10000"),
    "subset larger than the data": (["--train-subset", "1000000"], "--train-subset: 1000000 exceeds"),
    "cifar10 without data root": (["--dataset", "cifar10"], "--data-root"),
    "missing config file": (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    # defense specs
    "unknown defense": (["--defense", "nosuch"], "unknown defense 'nosuch'"),
    "defense parameter typo": (["--defense", "noise(sigm=0.1)"], "unknown parameter 'sigm'"),
    "negative sigma": (["--defense", "noise(sigma=-1)"], "--defense: noise: sigma must be in [0, 10]"),
    "sigma of the wrong type": (["--defense", "noise(sigma=True)"], "parameter 'sigma' must be float"),
    "unquoted string parameter": (["--defense", "noise(sigma=a)"], "'a' is not a literal value"),
    "unclosed parenthesis": (["--defense", "noise(sigma=0.1"], "unbalanced parentheses in 'noise(sigma=0.1'"),
    "extra parenthesis": (["--defense", "noise(sigma=0.1))"], "unmatched ')'"),
    "empty component": (["--defense", "noise+"], "--defense: defense 'noise+': part 2 of 2 is empty"),
    "parameter given twice": (["--defense", "noise(sigma=0.1, sigma=0.2)"], "'sigma' is given twice"),
    "positional defense parameter": (["--defense", "noise(0.1)"], "noise: use keyword arguments"),
    "prediction leakage on a vanilla split": (["--defense", "noise(sigma=0.01)+infoscissors(lam_y=1)"],
                                              "defense: 'noise(sigma=0.01)+infoscissors(lam_y=1)' works on "
                                              "the cloud's output or its gradient, which only --split ushaped"),
    # strategy specs
    "unknown strategy": (["--strategy", "FedNope"], "unknown strategy"),
    "strategy module missing": (["--strategy", "nosuch.module:X"], "nosuch.module"),
    "not a strategy class": (["--strategy", "os:path"], "--strategy: 'os:path' is a module"),
    "strategy kwarg typo": (["--strategy", "FedAvg(fraction_trian=0.5)"], "has no argument(s) fraction_trian"),
    "strategy kwarg of the wrong type": (["--strategy", "FedProx(proximal_mu='abc')"],
                                         "argument proximal_mu='abc' should be float"),
    "negative proximal mu": (["--strategy", "FedProx(proximal_mu=-1)"], "proximal_mu=-1 must be >= 0.0"),
    "strategy fraction above 1": (["--strategy", "FedAvg(fraction_train=2.0)"],
                                  "fraction_train=2.0 must be in [0.0, 1.0]"),
    "strategy that trains nobody": (["--strategy", "FedAvg(fraction_train=0.0)"],
                                    "has fraction_train=0: no client would ever train"),
    "more nodes than clients": (["--clients", "4", "--strategy", "FedAvg(min_train_nodes=5)"],
                                "waits for 5 nodes"),
    "more nodes than clients inside a DP wrapper": (
        ["--clients", "4", "--strategy", "DifferentialPrivacyServerSideFixedClipping(FedAvg(min_available_nodes=6), "
         "noise_multiplier=0.1, clipping_norm=1.0, num_sampled_clients=4)"],
        "waits for 6 nodes (min_train_nodes=1, min_available_nodes=6), but it has 4 clients"),
    "DP wrapper missing its arguments": (["--strategy", "DifferentialPrivacyServerSideFixedClipping(FedAvg())"],
                                         "missing required argument(s) noise_multiplier"),
    # attack specs
    "unknown attack": (["--attacks", "nosuch"], "--attacks: unknown attack 'nosuch'"),
    "attack parameter typo": (["--attacks", "decoder(epoch=3)"], "decoder: unknown parameter 'epoch'"),
    "attack parameter out of range": (["--attacks", "decoder(epochs=-3)"], "need epochs >= 1"),
    "attack parameter of the wrong type": (["--attacks", "rmle(steps='many')"], "parameter 'steps' must be int"),
    "stray comma in attacks": (["--attacks", "decoder,,rmle"], "entry 2 of 3 in 'decoder,,rmle' is empty"),
    "attack beyond the knowledge": (["--attacker-knowledge", "none", "--attacks", "rmle"],
                                    "'rmle' needs attacker knowledge 'whitebox'"),
    "pmc on a vanilla split": (["--attacks", "pmc"], "'pmc' needs --split ushaped"),
    "amc by a passive cloud": (["--split", "ushaped", "--attacks", "amc"], "'amc' needs --adversary active"),
}


@pytest.mark.parametrize("case", sorted(FLAGS))
def test_bad_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                  case: str) -> None:
    """Each flag mistake is caught before anything starts and named in one line.

    Run from an empty folder that must stay empty: a relative or empty ``--out`` would put a
    run directory there rather than under ``tmp_path / "runs"``.
    """
    monkeypatch.chdir(tmp_path)
    args, expected = FLAGS[case]
    rc, err = run_main(capsys, tmp_path / "runs", *args)
    assert_one_clean_line(rc, err, expected, tmp_path / "runs")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- YAML files

YAMLS: dict[str, tuple[str, str]] = {
    "broken yaml": ("clients: [1, 2\n", "is not valid YAML at line 2"),
    "tab indentation": ("clients: 4\n\trounds: 2\n", "is not valid YAML at line 2"),
    "key given twice": ("clients: 4\nrounds: 2\nclients: 8\n", "line 3: key 'clients' given twice (first at line 1)"),
    "not a mapping": ("- 1\n- 2\n", "must hold a mapping of settings, got list"),
    "unknown key": ("clients: 4\nnosuch_key: 1\n", "nosuch_key: unknown key"),
    "wrong type": ("clients: many\n", "clients: must be int, got 'many'"),
    "empty value": ("clients:\n", "clients: must not be empty"),
    "e-notation read as text": ("lr: 1e-3\n", "lr: must be float, got the string '1e-3'"),
    "NaN learning rate": ("lr: .nan\n", "lr: must be a finite number, got nan"),
    "groups not a list": ("groups:\n  fast: 0.5\n", "groups: must be a non-empty list of groups"),
    "group not a mapping": ("groups:\n  - 0.5\n", "groups[0]: must be a mapping, got float"),
    "unknown group key": ("groups:\n  - share: 1.0\n    colour: red\n", "groups[0].colour: unknown key"),
    "shares do not sum to 1": ("groups:\n  - share: 0.5\n  - share: 0.2\n", "groups: shares must sum to 1, got 0.7"),
    "zero share": ("groups:\n  - share: 0\n  - share: 1.0\n", "groups[0].share: must be in (0, 1]"),
    "a share that gives no client": ("clients: 2\ngroups:\n  - share: 0.9\n  - share: 0.1\n",
                                     "groups[1].share: gives no client out of 2"),
    "two groups of one name": ("groups:\n  - {name: a, share: 0.5}\n  - {name: a, share: 0.5}\n",
                               "groups[1].name: 'a' is also the name of groups[0]"),
    "bad group defense": ("groups:\n  - share: 1.0\n    defense: noise(sigma=-1)\n", "groups[0].defense: noise: sigma"),
    "bad group strategy": ("groups:\n  - share: 1.0\n    strategy: FedNope\n", "groups[0].strategy: unknown strategy"),
    "bad group cut": ("groups:\n  - share: 1.0\n    cut: 99\n", "groups[0].cut: cut layer must be in 1..6"),
    "unknown attack": ("attacks: nosuch\n", "attacks: unknown attack 'nosuch'"),
}


@pytest.mark.parametrize("case", sorted(YAMLS))
def test_bad_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """A mistake in a preset names the file (with a line number where YAML has one) and the key."""
    text, expected = YAMLS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    rc, err = run_main(capsys, tmp_path / "runs", "--config", str(path))
    line = assert_one_clean_line(rc, err, expected, tmp_path / "runs")
    assert str(path) in line


def test_group_inheriting_a_bad_flag_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A group that leaves ``cut`` out inherits ``--cut``: the flag is what must change."""
    path = tmp_path / "groups.yaml"
    path.write_text("groups:\n  - share: 0.5\n  - share: 0.5\n    cut: 2\n")
    rc, err = run_main(capsys, tmp_path / "runs", "--config", str(path), "--cut", "9")
    assert_one_clean_line(rc, err, "--cut (inherited by groups[0]): cut layer must be in 1..6", tmp_path / "runs")


@pytest.mark.parametrize("case", ["folder", "not UTF-8"])
def test_config_that_is_not_a_text_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """``--config`` given a folder or binary data is named as such, not as a missing file."""
    path = tmp_path / "conf"
    if case == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"clients: 4\n\xff\xfe\n")
    rc, err = run_main(capsys, tmp_path / "runs", "--config", str(path))
    expected = "is a folder, not a YAML file" if case == "folder" else "is not UTF-8 text (byte 11)"
    assert_one_clean_line(rc, err, f"--config: {path} {expected}", tmp_path / "runs")


def test_empty_and_comment_only_presets_are_fine(tmp_path: Path) -> None:
    """The control for the YAML cases: an empty file is no mistake; it means all defaults."""
    for text in ("", "# nothing set here\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        cfg = load_config(str(path), {"clients": 2})
        validate(cfg)
        assert cfg == SimConfig(clients=2)


# ------------------------------------------------------------------------------ data roots


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file as torchvision's MNIST folder holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array, dtype=np.uint8)
    path.write_bytes(bytes((0, 0, 8, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.tobytes())


def make_mnist(root: Path, n_train: int = 20, n_test: int = 10) -> Path:
    """A tiny but valid MNIST in torchvision's layout (``root/MNIST/raw``); returns that folder."""
    raw = root / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(n_train) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10)
    return raw


def make_cifar10(root: Path, per_batch: int = 4) -> Path:
    """A tiny but valid CIFAR-10 in torchvision's layout; returns ``root/cifar-10-batches-py``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def truncated_idx(tmp: Path) -> list[str]:
    """Real header (20 images of 28x28), payload cut after 100 bytes."""
    path = make_mnist(tmp / "data") / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    return ["--dataset", "mnist", "--data-root", str(tmp / "data")]


def truncated_idx_gz(tmp: Path) -> list[str]:
    """A gzipped IDX file cut in half: the gzip stream ends early."""
    raw = make_mnist(tmp / "data")
    path = raw / "t10k-images-idx3-ubyte"
    packed = gzip.compress(path.read_bytes())
    path.unlink()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(packed[: len(packed) // 2])
    return ["--dataset", "mnist", "--data-root", str(tmp / "data")]


def truncated_cifar(tmp: Path) -> list[str]:
    path = make_cifar10(tmp / "data") / "data_batch_3"
    path.write_bytes(path.read_bytes()[:200])
    return ["--dataset", "cifar10", "--data-root", str(tmp / "data")]


def labels_out_of_range(tmp: Path) -> list[str]:
    write_idx(make_mnist(tmp / "data") / "train-labels-idx1-ubyte", np.full(20, 200))
    return ["--dataset", "mnist", "--data-root", str(tmp / "data")]


def fewer_labels_than_images(tmp: Path) -> list[str]:
    write_idx(make_mnist(tmp / "data") / "train-labels-idx1-ubyte", np.zeros(7))
    return ["--dataset", "mnist", "--data-root", str(tmp / "data")]


def images_of_another_size(tmp: Path) -> list[str]:
    write_idx(make_mnist(tmp / "data") / "t10k-images-idx3-ubyte", np.zeros((10, 14, 14)))
    return ["--dataset", "mnist", "--data-root", str(tmp / "data")]


def more_clients_than_samples(tmp: Path) -> list[str]:
    make_mnist(tmp / "data", n_train=20)
    return ["--dataset", "mnist", "--data-root", str(tmp / "data"), "--clients", "30"]


def missing_data_root(tmp: Path) -> list[str]:
    return ["--dataset", "mnist", "--data-root", str(tmp / "nowhere")]


def data_root_is_a_file(tmp: Path) -> list[str]:
    (tmp / "data").write_text("not a folder")
    return ["--dataset", "cifar10", "--data-root", str(tmp / "data")]


DATA: dict[str, tuple[Args, str]] = {
    "truncated IDX file": (truncated_idx, "train-images-idx3-ubyte: truncated or corrupt IDX file (100 bytes"),
    "truncated gzip": (truncated_idx_gz, "t10k-images-idx3-ubyte.gz: cannot read IDX file"),
    "truncated CIFAR pickle": (truncated_cifar, "data_batch_3: cannot read CIFAR batch (pickle data was truncated)"),
    "labels out of range": (labels_out_of_range, "/data: train labels outside 0..9 (found 200..200)"),
    "fewer labels than images": (fewer_labels_than_images, "/data: train split has 20 images but 7 labels"),
    "test images of another size": (images_of_another_size, "/data: train images are 28x28x1 (HxWxC) but test"),
    "more clients than samples": (more_clients_than_samples, "--clients: 30 clients but only 20 training samples"),
    "missing data root": (missing_data_root, "/nowhere does not exist; expected a folder in torchvision's layout "
                                             "with MNIST/raw/{train-images-idx3-ubyte"),
    "data root is a file": (data_root_is_a_file, "/data is a file, not a folder"),
}


@pytest.mark.parametrize("case", sorted(DATA))
def test_bad_data_root(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """Damaged or missing dataset files are named by path, before any client starts."""
    build, expected = DATA[case]
    rc, err = run_main(capsys, tmp_path / "runs", *build(tmp_path))
    assert_one_clean_line(rc, err, expected, tmp_path / "runs")


class _RunsACommand:
    """Unpickles to ``os.system(command)``: what a crafted file in ``--data-root`` can do to plain pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


@pytest.mark.parametrize("where", ["top level", "inside the batch dict"])
def test_crafted_cifar_pickle_is_refused_without_running_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            where: str) -> None:
    """A CIFAR batch that would run a shell command on ``pickle.load`` is refused, and the command never runs."""
    marker = tmp_path / "the-command-ran"
    payload = _RunsACommand(f"touch {marker}")
    batch = payload if where == "top level" else {"data": payload, "labels": [0]}
    (make_cifar10(tmp_path / "data") / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    rc, err = run_main(capsys, tmp_path / "runs", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"))
    line = assert_one_clean_line(rc, err, "data_batch_2: cannot read CIFAR batch (refused: the pickle asks for "
                                 f"{os.system.__module__}.system", tmp_path / "runs")
    assert "numeric numpy arrays" in line
    assert not marker.exists(), "the crafted pickle ran its command"


def test_fake_data_roots_load_before_damage(tmp_path: Path) -> None:
    """The control for the data cases: the fake folders are valid, so the damage is what fails."""
    make_mnist(tmp_path / "mnist")
    make_cifar10(tmp_path / "cifar")
    assert load_dataset("mnist", str(tmp_path / "mnist")).train_x.shape == (20, 28, 28, 1)
    assert load_dataset("cifar10", str(tmp_path / "cifar")).train_x.shape == (20, 32, 32, 3)


# ------------------------------------------------------------ places outside the process


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def out_under_a_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("")
    return ["--out", str(tmp / "file" / "runs")]


def out_is_a_file(tmp: Path) -> list[str]:
    (tmp / "out").write_text("")
    return ["--out", str(tmp / "out")]


def export_under_a_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("")
    return ["--export-view", str(tmp / "file" / "view.npz")]


OUTSIDE: dict[str, tuple[Args, str]] = {
    # Tests run as root, where chmod stops no write: these paths fail for every user.
    "out whose parent is a file": (out_under_a_file, "/file is not a folder"),
    "out that is a file": (out_is_a_file, "/out is a file; give a folder name"),
    "out under /proc": (lambda tmp: ["--out", "/proc/sim-bad-input/runs"], "--out: cannot create the run directory"),
    "export view under a file": (export_under_a_file, "--export-view: cannot create"),
    "ray address nobody answers": (lambda tmp: ["--ray-address", f"127.0.0.1:{closed_port()}"],
                                   "--ray-address: nothing answers at 127.0.0.1:"),
    "ray address without a port": (lambda tmp: ["--ray-address", "localhost"],
                                   "--ray-address: 'localhost' is not auto, local, host:port"),
}


@pytest.mark.parametrize("case", sorted(OUTSIDE))
def test_unusable_place(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """An output path that cannot be written or a cluster that is not there fails before the run,
    naming the flag and its value (a wrong Ray address would otherwise retry for minutes, and a
    bad export path fail after the whole run)."""
    build, expected = OUTSIDE[case]
    flag, value = build(tmp_path)
    rc, err = run_main(capsys, tmp_path / "runs", flag, value)
    line = assert_one_clean_line(rc, err, expected, Path(value) if flag == "--out" else tmp_path / "runs")
    assert line.startswith(f"error: {flag}: ") and value in line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- from a shell


def broken_yaml(tmp: Path) -> list[str]:
    (tmp / "bad.yaml").write_text("clients: 4\ngroups: [\n")
    return ["--config", str(tmp / "bad.yaml")]


SHELL: dict[str, tuple[Args, str]] = {
    "zero clients": (lambda tmp: ["--clients", "0"], "--clients"),
    "strategy module missing": (lambda tmp: ["--strategy", "nosuch.module:X"], "nosuch.module"),
    "broken yaml": (broken_yaml, "is not valid YAML at line 3"),
    "truncated data file": (truncated_idx, "truncated or corrupt IDX file"),
    "out whose parent is a file": (out_under_a_file, "is not a folder"),
}


@pytest.mark.parametrize("case", sorted(SHELL))
def test_bad_input_from_the_shell_has_no_traceback(tmp_path: Path, case: str) -> None:
    """The real entry point, as a user runs it: the process prints one line and exits 2."""
    build, expected = SHELL[case]
    proc = run_cli(tmp_path / "runs", *build(tmp_path), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` is where a user goes after an error line that says "see --help"."""
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--clients", "--rounds", "--defense", "--strategy", "--dataset", "--data-root",
                 "--partition", "--alpha", "--protocol", "--config", "--seed", "--out", "--device",
                 "--client-cpus", "--client-gpus", "--ray-address"):
        assert flag in out


def test_cuda_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Asking for CUDA where none is visible fails before Ray starts (skipped where a GPU is)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    rc, err = run_main(capsys, tmp_path / "runs", "--device", "cuda")
    assert_one_clean_line(rc, err, "--device: CUDA requested", tmp_path / "runs")


# ---------------------------------------------------------------------- runs that cannot go on


def run_folder(tmp: Path) -> Path:
    """A run directory as sim.run leaves it: its config.yaml and a checkpoint of round 0."""
    from sim import checkpoint

    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(SimConfig().to_dict()))
    checkpoint.save(run_dir, {"round": 0, "heads": [{}]})
    return run_dir


def corrupt_checkpoint(tmp: Path) -> list[str]:
    run_dir = run_folder(tmp)
    path = run_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:40])
    return ["--resume", str(run_dir)]


def missing_checkpoint(tmp: Path) -> list[str]:
    run_dir = run_folder(tmp)
    (run_dir / "checkpoint.pt").unlink()
    return ["--resume", str(run_dir)]


def checkpoint_of_another_config(tmp: Path) -> list[str]:
    from sim import checkpoint

    run_dir = run_folder(tmp)
    checkpoint.save(run_dir, {"round": 0, "heads": [{}, {}]})  # two groups; the config has one
    return ["--resume", str(run_dir)]


def not_a_run_folder(tmp: Path) -> list[str]:
    return ["--resume", str(tmp)]


def resume_with_another_flag(tmp: Path) -> list[str]:
    return ["--resume", str(run_folder(tmp)), "--rounds", "9"]


RESUME: dict[str, tuple[Args, str]] = {
    "corrupt checkpoint": (corrupt_checkpoint, "checkpoint.pt: corrupt or not a checkpoint"),
    "missing checkpoint": (missing_checkpoint, "checkpoint.pt: no checkpoint"),
    "checkpoint of another config": (checkpoint_of_another_config, "does not match the run's config.yaml"),
    "not a run folder": (not_a_run_folder, "is not a run directory (no config.yaml)"),
    "resume with another flag": (resume_with_another_flag, "--resume: takes no other flag (--rounds given)"),
}


@pytest.mark.parametrize("case", sorted(RESUME))
def test_bad_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """Nothing is started, and the run's folder is left exactly as it was."""
    build, expected = RESUME[case]
    args = build(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    try:
        rc = main(args)
    except SystemExit as exc:
        rc = exc.code
    assert_one_clean_line(rc, capsys.readouterr().err, expected, tmp_path / "runs")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_its_checkpoint(tmp_path: Path) -> None:
    """A learning rate so large that the loss turns NaN: found during the run, exit 1, one
    error line, and the checkpoint of the last complete round (here: before the first) kept."""
    from sim import checkpoint

    proc = run_cli(tmp_path / "runs", "--clients", "2", "--rounds", "2", "--train-subset", "600",
                   "--attacks", "none", "--lr", "1e10", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "the training loss is nan" in errors[0] and "--resume" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert checkpoint.load(run_dir)["round"] == 0
