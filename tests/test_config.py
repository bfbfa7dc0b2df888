import dataclasses
from typing import Literal

import pytest

from jbilevel import config as cfg


@dataclasses.dataclass(frozen=True)
class Opt:
    lr: float = 1e-3  # step size
    betas: tuple[float, float] = (0.9, 0.95)  # Adam moments


@dataclasses.dataclass(frozen=True)
class Run:
    method: Literal["bds", "bmo", "sft"] = "bds"  # algorithm
    steps: int = 10  # optimizer steps
    batch_size: int = 8  # examples per step
    targets: tuple[str, ...] = ("q_proj",)  # LoRA targets
    out: str | None = None  # output directory
    opt: Opt = Opt()  # optimizer

    def __post_init__(self):
        if self.batch_size % 2:
            raise ValueError(f"batch_size={self.batch_size} must be even")


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: bmo\nopt:\n  lr: 0.01\n")
    run = cfg.load(Run, path, ["opt.betas=[0.8, 0.9]", "steps=3", "targets=[q_proj, v_proj]"])
    assert run == Run(method="bmo", steps=3, targets=("q_proj", "v_proj"),
                      opt=Opt(lr=0.01, betas=(0.8, 0.9)))
    assert cfg.load(Run) == Run()
    # int is accepted where a float is expected, never the other way round.
    assert cfg.load(Run, overrides=["opt.lr=1"]).opt.lr == 1.0


def test_round_trip(tmp_path):
    run = Run(method="sft", out="x", targets=("a", "b"), opt=Opt(lr=0.5))
    cfg.dump(run, tmp_path / "r.yaml")
    assert cfg.load(Run, tmp_path / "r.yaml") == run


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("step: 3\n", [], r"run.yaml: unknown key 'step' .*did you mean 'steps'\?"),
        ("opt:\n  lrr: 3\n", [], r"unknown key 'opt.lrr' .*did you mean 'opt.lr'\?"),
        ("steps: 2.5\n", [], r"run.yaml: steps must be an integer, got 2.5 \(float\)"),
        ("", ["steps=abc"], r"steps must be an integer, got 'abc'"),
        ("", ["method=adam"], r"method must be one of 'bds', 'bmo', 'sft', got 'adam'"),
        ("", ["opt.betas=[0.9]"], r"opt.betas must be a list of 2 items"),
        ("", ["batch_size=3"], r"run.yaml \+ command line: batch_size=3 must be even"),
        ("", ["steps"], r"override 'steps': expected key=value"),
        ("- a\n", [], r"run.yaml: the top level must be a mapping"),
    ],
)
def test_errors_name_file_key_and_fix(tmp_path, text, overrides, match):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.load(Run, path, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(cfg.ConfigError, match="nope.yaml: config file not found"):
        cfg.load(Run, tmp_path / "nope.yaml")


@pytest.mark.parametrize("written, value", [
    ("1e-5", 1e-5), ("5e-6", 5e-6), ("5E-6", 5e-6), (".5", 0.5), ("1.5e3", 1500.0),
    ("-2e+2", -200.0), ("1_000", 1000), ("1.0e-5", 1e-5), ("3", 3),
])
def test_numbers_as_users_write_them(tmp_path, written, value):
    """YAML 1.2 / Python number syntax, in a file and on the command line."""
    (tmp_path / "run.yaml").write_text(f"opt:\n  lr: {written}\n")
    assert cfg.load(Run, tmp_path / "run.yaml").opt.lr == value
    assert cfg.load(Run, overrides=[f"opt.lr={written}"]).opt.lr == value


def test_strings_that_look_like_numbers_stay_errors():
    with pytest.raises(cfg.ConfigError, match=r"opt.lr must be a number, got '1e' \(str\)"):
        cfg.load(Run, overrides=["opt.lr=1e"])
    with pytest.raises(cfg.ConfigError, match=r"steps must be an integer, got 1000.0 \(float\)"):
        cfg.load(Run, overrides=["steps=1e3"])  # as in Python: 1e3 is a float
    assert cfg.load(Run, overrides=["out=1e-5x"]).out == "1e-5x"


def test_replace_applies_checked_overrides():
    run = Run(method="sft", targets=("a",))
    assert cfg.replace(run, ["opt.lr=5e-6", "steps=4"]) == Run(
        method="sft", targets=("a",), steps=4, opt=Opt(lr=5e-6))
    with pytest.raises(cfg.ConfigError, match=r"unknown key 'opt.lrr'"):
        cfg.replace(run, ["opt.lrr=1"])
