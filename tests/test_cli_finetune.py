"""``tucker-manifold finetune`` / ``finetune-conv``: wired into the CLI, help works, bad options name the flag.

Fast: nothing is trained (every case fails or exits before a model is built)."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tucker_manifold.cli import main  # noqa: E402


@pytest.mark.parametrize("command, flags", [
    ("finetune", ["--methods", "--seeds", "--max-length", "--train-size", "--tau", "--threads"]),
    ("finetune-conv", ["--methods", "--seeds", "--pretrain-size", "--train-size", "--lora-rank", "--tau"]),
])
def test_help(command, flags, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"tucker-manifold {command}" in out
    for flag in flags:
        assert flag in out


def test_listed_in_top_level_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "finetune-conv" in out


@pytest.mark.parametrize("argv, flag", [
    (["finetune", "--epochs", "x"], "--epochs"),             # argparse type error
    (["finetune", "--max-length", "4"], "--max-length"),     # FinetuneConfig.validate
    (["finetune", "--train-size", "5"], "--train-size"),
    (["finetune", "--tau", "-1"], "--tau"),
    (["finetune", "--methods", "nope"], "--methods"),
    (["finetune", "--lr", "lora-qv=abc"], "--lr"),
    (["finetune", "--bogus"], "--bogus"),                    # unknown option
    (["finetune-conv", "--tau", "-1"], "--tau"),
    (["finetune-conv", "--train-size", "0"], "--train-size"),  # ConvDemoConfig.finetune_size
    (["finetune-conv", "--epochs", "0"], "--epochs"),
])
def test_bad_option_names_the_flag(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err, err
    assert "Traceback" not in err


def test_valid_options_reach_the_config(monkeypatch):
    """The options parsed by the subcommand become the demo's config (the run itself is stubbed out)."""
    from tucker_manifold.adapters import finetune

    seen = {}
    monkeypatch.setattr(finetune, "run_finetune", lambda cfg: seen.setdefault("cfg", cfg))
    assert main(["finetune", "--methods", "head,lora-qv", "--seeds", "3", "--max-length", "16",
                 "--train-size", "0", "--tau", "0.2", "--no-progress"]) == 0
    cfg = seen["cfg"]
    assert list(cfg.methods) == ["head", "lora-qv"] and list(cfg.seeds) == [3]
    assert cfg.max_length == 16 and cfg.train_size is None and cfg.tau == 0.2 and cfg.progress is False
