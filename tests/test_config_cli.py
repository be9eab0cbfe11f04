import dataclasses
import subprocess
import sys
import time

import pytest

from steerlm import cli
from steerlm import config as C
from steerlm.errors import UserError


@dataclasses.dataclass
class Inner:
    levels: int = 10
    """Levels."""
    names: list[str] = dataclasses.field(default_factory=lambda: ["quality"])
    """Names."""


@dataclasses.dataclass
class Outer:
    out: str
    """Where to write."""
    data: Inner = dataclasses.field(default_factory=Inner)
    """Data settings."""
    lr: float = 1e-3
    """Learning rate."""
    resume: bool = False
    """Resume."""
    note: str | None = None
    """A note."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("lr must be positive")


def test_yaml_plus_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: a\ndata:\n  levels: 5\nlr: 0.1\n")
    cfg = C.load(Outer, config=str(path), overrides={"data.levels": 3, "lr": 2})
    assert cfg == Outer(out="a", data=Inner(levels=3), lr=2.0)
    assert C.load(Outer, overrides={"out": "a", "lr": "1e-3"}).lr == 1e-3  # YAML 1.1 reads 1e-3 as text
    saved = C.save(cfg, tmp_path / "o")
    assert C.load(Outer, config=str(saved)) == cfg


@dataclasses.dataclass
class Tuned:
    data: Inner = dataclasses.field(default_factory=lambda: Inner(levels=5, names=["humor"]))
    """A section whose default differs from Inner's own."""


def test_partial_section_keeps_the_fields_own_default():
    assert C.load(Tuned, overrides={"data.levels": 3}).data == Inner(levels=3, names=["humor"])
    assert C.load(Tuned, overrides={}).data == Inner(levels=5, names=["humor"])


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"out": "a", "data.levls": 3}, "data.levls: unknown setting"),
        ({"out": "a", "data.levels": "five"}, "data.levels: expected an integer"),
        ({"out": "a", "resume": "yes"}, "resume: expected true or false"),
        ({}, "out: required setting is missing"),
        ({"out": "a", "lr": -1}, "lr must be positive"),
    ],
)
def test_config_errors_name_the_key(overrides, needle):
    with pytest.raises(UserError, match=needle):
        C.load(Outer, overrides=overrides)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("out: a\ndata: [1,\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: malformed YAML"):
        C.load(Outer, config=str(path))


def test_field_docs_and_describe():
    rows = {k: (t, d) for k, t, d in C.describe(Outer)}
    assert rows["data.levels"][1] == "Levels."
    assert rows["out"][0].endswith("required")


def test_parse_args_handles_forms():
    config, preset, overrides, positional = cli.parse_args(
        [
            "--config",
            "x.yaml",
            "--a.b=3",
            "--flag",
            "--name",
            "n",
            "--attr",
            "humor=7",
            "--attr=quality=9",
            "--stop",
            "User:",
            "hi",
        ],
        list_fields={"attr", "stop"},
        bool_fields={"flag"},
    )
    assert (config, preset, positional) == ("x.yaml", None, ["hi"])
    assert overrides == {"a.b": 3, "flag": True, "name": "n", "attr": ["humor=7", "quality=9"], "stop": ["User:"]}


def test_help_is_fast_and_lists_commands():
    start = time.time()
    res = subprocess.run([sys.executable, "-m", "steerlm.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "train-apm" in res.stdout
    assert time.time() - start < 5  # interpreter start included; the import itself pulls no torch
    res = subprocess.run(
        [sys.executable, "-c", "import sys, steerlm.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert res.stdout.strip() == "False"


def test_unknown_command_exits_2(capsys):
    assert cli.run(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_describe_shows_a_sections_own_default_factory():
    # The help must show the defaults a run gets: `Tuned.data` is built by its factory, not by Inner's defaults.
    rows = {k: t for k, t, _ in C.describe(Tuned)}
    assert rows["data.levels"] == "int = 5" and rows["data.names"] == "list[str] = ['humor']"


def _help(capsys, command: str) -> str:
    assert cli.run([command, "--help"]) == 0
    return capsys.readouterr().out


def test_ppo_help_shows_the_real_rollout_sampling_defaults(capsys):
    from steerlm import ppo

    out = _help(capsys, "ppo")
    real = ppo.Config(policy="tiny-lm").sampling  # what a run gets
    assert (real.temperature, real.top_p, real.max_new_tokens) == (1.0, 1.0, 64)
    assert "--sampling.temperature  (float = 1.0)" in out
    assert "--sampling.top_p  (float = 1.0)" in out
    assert "--sampling.max_new_tokens  (int = 64)" in out


def test_help_expands_stage_sections_and_lists_presets(capsys):
    out = _help(capsys, "pipeline")
    # a `dict` section is shown as the settings of the command it is passed to, less the paths the pipeline fills in
    assert "--sft.train.lora.r  (int = 0)" in out and "--apm.kind  (" in out
    assert "--sft.data  (" not in out and "--sft  (dict" not in out
    for name in ("quickstart", "steer", "tiny"):
        assert f"\n  {name} " in out.split("settings (")[0]
    rlhf = _help(capsys, "rlhf")
    assert "--ppo.sampling.temperature  (float = 1.0)" in rlhf and "--ppo.policy  (" not in rlhf
    assert "presets (" not in _help(capsys, "generate")  # a command without presets lists none


@pytest.mark.parametrize(
    "module,cls,required",
    [
        ("generate", "Config", {"model": "tiny-lm", "prompt": ["hi"]}),
        ("chat", "Config", {"model": "tiny-lm"}),
        ("serve", "Config", {"model": "tiny-lm"}),
        ("ppo", "Config", {"policy": "tiny-lm", "reward_fn": "m:f"}),
        ("evaluate", "ModelSpec", {"name": "m", "path": "tiny-lm"}),
        ("sft", "Config", {"data": "d"}),
    ],
)
def test_auto_is_spelled_one_way_and_the_old_spelling_still_works(module, cls, required):
    import importlib

    config_cls = getattr(importlib.import_module(f"steerlm.{module}"), cls)
    assert C.build(config_cls, required).template == "auto"
    assert C.build(config_cls, {**required, "template": "nemo"}).template == "nemo"
    if module != "sft":  # sft never had the '' spelling
        with pytest.warns(FutureWarning, match="deprecated, write 'auto'"):
            assert C.build(config_cls, {**required, "template": ""}).template == "auto"
    with pytest.raises(UserError, match="auto"):
        C.build(config_cls, {**required, "template": "jinja"})


@pytest.mark.parametrize(
    ("module", "cls", "required"),
    [
        ("generate", "Config", {"model": "tiny-lm", "prompt": ["hi"]}),
        ("chat", "Config", {"model": "tiny-lm"}),
        (
            "evaluate",
            "Config",
            {
                "models": [{"name": "m", "path": "tiny-lm"}],
                "prompts": [{"name": "p", "path": "p.jsonl"}],
                "quality": {"enabled": False},
            },
        ),
        ("merge", "Config", {"adapter": "a", "out": "o"}),
        ("serve", "Config", {"model": "tiny-lm"}),
        ("sft", "Config", {"data": "d"}),
    ],
)
def test_dtype_defaults_to_fp32_by_name_and_the_old_empty_spelling_still_works(module, cls, required):
    import importlib

    config_cls = getattr(importlib.import_module(f"steerlm.{module}"), cls)
    assert C.build(config_cls, required).dtype == "fp32"
    assert C.build(config_cls, {**required, "dtype": "bf16"}).dtype == "bf16"
    with pytest.warns(FutureWarning, match="deprecated, write 'fp32'"):
        assert C.build(config_cls, {**required, "dtype": ""}).dtype == "fp32"
    with pytest.raises(UserError, match="fp32, bf16, fp16, auto"):
        C.build(config_cls, {**required, "dtype": "int8"})
