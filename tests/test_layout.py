"""Memory layout (tucker_manifold.layout): channels_last changes the speed and rounding of a run, never
the function it computes, and the default layout reproduces the runs made before it existed."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tucker_manifold.experiments import TrainConfig, run_experiment
from tucker_manifold.layout import MEMORY_FORMATS, check_memory_format, to_layout
from tucker_manifold.models import VGGMnist
from tucker_manifold.nn import tuckerize
from tucker_manifold.optim import TDLRT

SMALL = dict(model="vgg-mnist", data="digits", subset=96, epochs=1, batch_size=32, rank_every=1)


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = VGGMnist(in_channels=1, num_classes=10, image_size=28).double()
    tuckerize(net, rank_fraction=0.5)
    return net


@pytest.mark.parametrize("bad", ["nhwc", None, 3])
def test_bad_memory_format_names_the_argument(bad):
    with pytest.raises(ValueError, match="memory_format"):
        check_memory_format(bad)
    with pytest.raises(ValueError, match="memory_format"):
        TrainConfig(memory_format=bad).validate()


def test_channels_last_reaches_past_a_one_channel_input():
    # MNIST's first conv has one input channel: without the output hook the net would stay contiguous
    net = to_layout(_net(), "channels_last")
    seen = []
    first = net.features[0]
    first.register_forward_hook(lambda m, i, o: seen.append(o))
    net(to_layout(torch.randn(4, 1, 28, 28, dtype=torch.float64), "channels_last"))
    out = seen[0]
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    to_layout(net, "contiguous")  # removes the hooks again
    seen.clear()
    net(torch.randn(4, 1, 28, 28, dtype=torch.float64))
    assert seen[-1].is_contiguous()


@pytest.mark.parametrize("seed", [0, 1])
def test_layouts_compute_the_same_function_and_tdlrt_steps(seed):
    """Same outputs (1e-12) and the same three TDLRT steps (ranks equal, parameters 1e-10) in float64."""
    torch.manual_seed(100 + seed)
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    results = {}
    for fmt in MEMORY_FORMATS:
        net = to_layout(_net(seed), fmt)
        opt = TDLRT(net.parameters(), lr=0.05, momentum=0.9, tau=0.05)
        xs = to_layout(x, fmt)
        out0 = net(xs).detach()

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(net(xs), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        results[fmt] = (out0, copy.deepcopy(net.state_dict()))
    (o1, s1), (o2, s2) = results["channels_last"], results["contiguous"]
    assert torch.allclose(o1, o2, rtol=0, atol=1e-12)
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k].shape == s2[k].shape, k  # ranks
        if s1[k].is_floating_point():
            assert torch.allclose(s1[k], s2[k], rtol=1e-10, atol=1e-10), k


def test_default_is_channels_last_and_runs_are_deterministic(tmp_path):
    pytest.importorskip("sklearn")
    assert TrainConfig().memory_format == "channels_last"
    a = run_experiment(TrainConfig.from_dict(SMALL), progress=False, plot=False).history[-1]
    b = run_experiment(TrainConfig.from_dict(SMALL), progress=False, plot=False).history[-1]
    assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"] and a["ranks"] == b["ranks"]
    c = run_experiment(TrainConfig.from_dict({**SMALL, "memory_format": "contiguous"}), progress=False,
                       plot=False).history[-1]
    # another layout rounds differently, but trains the same net: the same order of loss
    assert abs(c["train_loss"] - a["train_loss"]) < 0.1 * a["train_loss"]
