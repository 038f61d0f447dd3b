"""Bad input gets one line naming the field, exit code 2, and no run directory."""

from __future__ import annotations

import pytest

from sim.run import main
from tests.simhelpers import run_cli


def run_main(capsys, out, *args):
    """``sim.run.main`` in-process (fast); argparse's own errors exit through SystemExit."""
    try:
        rc = main(["--out", str(out), *args])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err

CASES = {
    "zero clients": (["--clients", "0"], "clients"),
    "unknown defense": (["--defense", "nosuch"], "unknown defense 'nosuch'"),
    "defense parameter typo": (["--defense", "noise(sigm=0.1)"], "unknown parameter 'sigm'"),
    "cifar10 without data root": (["--dataset", "cifar10"], "--data-root"),
    "strategy module missing": (["--strategy", "nosuch.module:X"], "nosuch.module"),
    "unknown strategy": (["--strategy", "FedNope"], "unknown strategy"),
    "bad protocol": (["--protocol", "sflv3"], "protocol"),
    "bad fraction": (["--fraction", "1.5"], "fraction"),
    "not a number": (["--rounds", "two"], "--rounds"),
    "unknown flag": (["--nosuch-flag", "1"], "nosuch-flag"),
    "more clients than samples": (["--clients", "100", "--train-subset", "50"], "clients"),
    "cut out of range": (["--cut", "9"], "cut"),
    "missing config file": (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    "unknown split": (["--split", "vshaped"], "split: 'vshaped' unknown"),
    "pmc on a vanilla split": (["--attacks", "pmc"], "'pmc' needs --split ushaped"),
    "amc by a passive cloud": (["--split", "ushaped", "--attacks", "amc"], "'amc' needs --adversary active"),
    "unknown adversary": (["--adversary", "evil"], "adversary"),
    "prediction leakage on a vanilla split": (["--defense", "noise(sigma=0.01)+infoscissors(lam_y=1)"],
                                              "defense: 'noise(sigma=0.01)+infoscissors(lam_y=1)' regularises "
                                              "the cloud's output, which only --split ushaped"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_flag(tmp_path, capsys, case):
    args, expected = CASES[case]
    rc, err = run_main(capsys, tmp_path / "runs", *args)
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args", [["--clients", "0"], ["--strategy", "nosuch.module:X"]])
def test_bad_input_from_the_shell_has_no_traceback(tmp_path, args):
    proc = run_cli(tmp_path / "runs", *args, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


YAMLS = {
    "unknown key": ("clients: 4\nnosuch_key: 1\n", "nosuch_key"),
    "wrong type": ("clients: many\n", "clients"),
    "shares do not sum to 1": ("groups:\n  - share: 0.5\n  - share: 0.2\n", "sum to 1"),
    "unknown group key": ("groups:\n  - share: 1.0\n    colour: red\n", "colour"),
    "bad group defense": ("groups:\n  - share: 1.0\n    defense: noise(sigma=-1)\n", "sigma"),
    "not a mapping": ("- 1\n- 2\n", "mapping"),
    "broken yaml": ("clients: [1, 2\n", "YAML"),
}


@pytest.mark.parametrize("case", sorted(YAMLS))
def test_bad_yaml(tmp_path, capsys, case):
    text, expected = YAMLS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    rc, err = run_main(capsys, tmp_path / "runs", "--config", str(path))
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--clients", "--rounds", "--defense", "--strategy", "--dataset", "--data-root",
                 "--partition", "--alpha", "--protocol", "--config", "--seed", "--out", "--device",
                 "--client-cpus", "--client-gpus", "--ray-address"):
        assert flag in out
