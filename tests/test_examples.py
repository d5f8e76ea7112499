"""The examples run and reach what they claim (with fewer steps than their defaults)."""
import importlib.util
import pathlib

import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_geoopt_quickstart_completion(capsys):
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    out = load("geoopt_quickstart").main(["--steps", "150", "--print-every", "50"])
    # measured at 150 steps, seeds 0-4: test error 2.6e-4 .. 6.4e-4, loss ratio ~2e-8
    assert out["final_loss"] < 1e-5 * out["initial_loss"]
    assert out["initial_test_error"] > 0.5
    assert out["final_test_error"] < 2e-3
    assert out["on_manifold"]
    assert [h[0] for h in out["history"]] == [0, 50, 100, 150]
    printed = capsys.readouterr().out
    assert "final relative test error" in printed and "test rel err" in printed
    # main leaves global torch state as it found it
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == dtype
