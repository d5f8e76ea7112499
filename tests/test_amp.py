"""Mixed precision (tucker_manifold.amp): the loss-scale protocol of TDLRT / ParallelTDLRT (a scaled step
equals the unscaled one, the records' core gradients included; an overflow goes through the rollback
with weights, state and ranks bit-identical and the scale backed off), fp16 and bf16 autocast on CPU,
the training loop under each precision, and bad input."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import tucker_manifold.optim as optim_mod
from tucker_manifold.amp import PRECISIONS, MixedPrecision, check_precision, scaled_step, unscale_grads_, unscaled
from tucker_manifold.nn import tuckerize
from tucker_manifold.optim import TDLRT, ParallelTDLRT, SinglePassFallbackWarning
from tucker_manifold.parameter import is_tucker_parameter


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 3),
    )
    return tuckerize(net, rank_fraction=0.5).to(dtype)


def batches(n=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 1, 6, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


def make_closure(model, opt, x, y, mp: MixedPrecision | None = None, scaler=None, poison=False):
    def closure():
        opt.zero_grad(set_to_none=True)
        with mp.autocast() if mp is not None else torch.autocast("cpu", enabled=False):
            out = model(x)
            if poison:  # an overflow in the backward: every gradient below the output is inf
                out.register_hook(lambda g: g * float("inf"))
            loss = nn.functional.cross_entropy(out, y)
        if mp is not None:
            mp.backward(loss)
        elif scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        return loss
    return closure


def snapshot(model, opt):
    """Everything a skipped step must leave alone: weights, sizes, optimizer state (BatchNorm's running
    statistics are the forward's, not the step's: they move with every forward, skipped or not)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()
          if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    st = copy.deepcopy(opt.state_dict())
    return sd, st


def assert_same(a, b):
    (sd1, st1), (sd2, st2) = a, b
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert sd1[k].shape == sd2[k].shape and torch.equal(sd1[k], sd2[k]), k
    s1, s2 = st1["state"], st2["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for k, v in s1[i].items():
            w = s2[i][k]
            assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), (i, k)


def params_max_diff(m1, m2):
    return max(float((p - q).detach().abs().max()) for p, q in zip(m1.parameters(), m2.parameters()))


OPTIMIZERS = {
    "tdlrt-onepass": lambda m: TDLRT(m.parameters(), lr=0.1, tau=0.1, momentum=0.9),
    "tdlrt-twopass": lambda m: TDLRT(m.parameters(), lr=0.1, tau=0.1, momentum=0.9, single_pass=False),
    "tdlrt-adam": lambda m: TDLRT(m.parameters(), lr=0.01, tau=0.1, method="adam"),
    "parallel": lambda m: ParallelTDLRT(m.parameters(), lr=0.1, tau=0.1, momentum=0.9),
}


# ------------------------------------------------------------------------------------ the protocol
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scaled_step_equals_unscaled_float64(name):
    """A step under a scale of 2^10 equals the unscaled step (power-of-two scaling is exact in float64):
    p.grad and the one-pass core gradients rebuilt from (scaled) records are both unscaled."""
    ref, mod = tiny_net(), tiny_net()
    opt_r, opt_s = OPTIMIZERS[name](ref), OPTIMIZERS[name](mod)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    for x, y in batches():
        opt_r.step(make_closure(ref, opt_r, x, y))
        _, skipped = scaled_step(scaler, opt_s, make_closure(mod, opt_s, x, y, scaler=scaler))
        assert not skipped
    assert scaler.get_scale() == 2.0**10
    if name != "tdlrt-twopass":  # unscaled records pass the check against autograd's core gradient
        assert {i["core_gradient"] for i in opt_s.last_step_info} == {"records"}
    assert [p.shape for p in ref.parameters()] == [p.shape for p in mod.parameters()]
    assert params_max_diff(ref, mod) <= 1e-12
    assert not hasattr(opt_s, "grad_scale") and not hasattr(opt_s, "found_inf")  # set for the step only


def test_negative_control_records_left_scaled(monkeypatch):
    """The check above fails when the records' core gradients keep the scale."""
    monkeypatch.setattr(optim_mod, "unscaled", lambda opt, t: t)
    ref, mod = tiny_net(), tiny_net()
    opt_r, opt_s = OPTIMIZERS["tdlrt-onepass"](ref), OPTIMIZERS["tdlrt-onepass"](mod)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with pytest.warns(Warning):  # rebuilt and autograd core gradients disagree: TDLRT falls back
        for x, y in batches(2):
            opt_r.step(make_closure(ref, opt_r, x, y))
            scaled_step(scaler, opt_s, make_closure(mod, opt_s, x, y, scaler=scaler))
    # the scaled records disagree with autograd's (unscaled) core gradient by the scale: rejected
    assert {i["core_gradient"] for i in opt_s.last_step_info} == {"second pass"}


def test_torch_recipe_without_closure_equals_unscaled():
    """``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`` works with one-pass TDLRT:
    GradScaler.step sets grad_scale (the class declares _step_supports_amp_scaling) and TDLRT unscales."""
    assert TDLRT._step_supports_amp_scaling
    ref, mod = tiny_net(), tiny_net()
    opt_r, opt_s = OPTIMIZERS["tdlrt-onepass"](ref), OPTIMIZERS["tdlrt-onepass"](mod)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches():
        opt_r.step(make_closure(ref, opt_r, x, y))
        make_closure(mod, opt_s, x, y, scaler=scaler)()
        scaler.step(opt_s)
        scaler.update()
    assert params_max_diff(ref, mod) <= 1e-12


@pytest.mark.parametrize("name", ["tdlrt-onepass", "tdlrt-twopass", "parallel"])
def test_overflow_goes_through_rollback(name):
    """An inf in the scaled backward: the step is skipped (weights, ranks and optimizer state
    bit-identical), counted, and the scale halves; the next step proceeds as usual."""
    model = tiny_net()
    opt = OPTIMIZERS[name](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    (x0, y0), (x1, y1), (x2, y2) = batches(3)
    scaled_step(scaler, opt, make_closure(model, opt, x0, y0, scaler=scaler))  # momentum state exists
    before = snapshot(model, opt)
    ranks_before = [p.manifold.ranks for p in model.parameters() if is_tucker_parameter(p)]
    with pytest.warns(RuntimeWarning, match="step skipped"):
        _, skipped = scaled_step(scaler, opt, make_closure(model, opt, x1, y1, scaler=scaler, poison=True))
    assert skipped and opt.skipped_steps == 1
    assert scaler.get_scale() == 2.0**9
    assert_same(before, snapshot(model, opt))
    assert ranks_before == [p.manifold.ranks for p in model.parameters() if is_tucker_parameter(p)]
    _, skipped = scaled_step(scaler, opt, make_closure(model, opt, x2, y2, scaler=scaler))
    assert not skipped and scaler.get_scale() == 2.0**9
    after = snapshot(model, opt)
    assert any(not torch.equal(after[0][k], before[0][k]) for k in before[0] if after[0][k].shape == before[0][k].shape)


def test_fp16_autocast_overflow_backs_off_until_a_step_proceeds():
    """Real fp16 on CPU: a loss scale of 2^40 overflows fp16's range (65504) in the backward; every
    such step is skipped through the rollback with everything bit-identical and the scale halves,
    until the scale fits and steps proceed. Parameters stay float32 throughout."""
    model = tiny_net(torch.float32)
    opt = OPTIMIZERS["tdlrt-onepass"](model)
    mp = MixedPrecision("fp16", "cpu", init_scale=2.0**40, growth_interval=10**6)
    data = batches(2, torch.float32)
    skipped = 0
    for k in range(40):
        x, y = data[k % 2]
        before = snapshot(model, opt)
        scale = mp.scaler.get_scale()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            mp.step(opt, make_closure(model, opt, x, y, mp=mp))
        if any("step skipped" in str(m.message) for m in w):
            skipped += 1
            assert mp.scaler.get_scale() == scale / 2
            assert_same(before, snapshot(model, opt))
        else:
            break
    assert 5 <= skipped < 40 and opt.skipped_steps == skipped  # 2^40 cannot fit; some smaller scale does
    for _ in range(3):
        x, y = data[0]
        mp.step(opt, make_closure(model, opt, x, y, mp=mp))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    for p in model.parameters():
        if is_tucker_parameter(p):
            for u in p.manifold.unpack(p.detach())[1]:  # bases orthonormal to fp32 accuracy (QR/SVD in fp32)
                eye = torch.eye(u.shape[1])
                assert float((u.T @ u - eye).abs().max()) < 1e-5


def test_generic_optimizer_skips_through_the_scaler():
    """SGD (dense / vanilla / cp methods) under fp16: the torch path; a skip is counted by
    MixedPrecision and leaves the weights alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mp = MixedPrecision("fp16", "cpu", init_scale=2.0**8)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    mp.step(opt, make_closure(model, opt, x, y, mp=mp))
    w = model[0].weight.detach().clone()
    mp.step(opt, make_closure(model, opt, x, y, mp=mp, poison=True))
    assert mp.skipped_steps == 1 and mp.scaler.get_scale() == 2.0**7
    assert torch.equal(model[0].weight, w)


def test_unscale_helpers():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([1.0, 3.0, -5.0])
    unscale_grads_(opt, [p])  # no scale set: nothing
    assert torch.equal(p.grad, torch.tensor([1.0, 3.0, -5.0])) and unscaled(opt, p.grad) is p.grad
    opt.grad_scale = torch.tensor(4.0)
    unscale_grads_(opt, [p])
    assert torch.equal(p.grad, torch.tensor([0.25, 0.75, -1.25]))
    assert torch.equal(unscaled(opt, torch.tensor([8.0])), torch.tensor([2.0])) and unscaled(opt, None) is None


# ------------------------------------------------------------------------------------ MixedPrecision
def test_precisions_on_cpu():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    conv = nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 5, 5)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        mp = MixedPrecision(precision, "cpu")
        with mp.autocast():
            assert conv(x).dtype == dtype
        assert (mp.scaler is not None) == (precision == "fp16") and mp.enabled == (precision != "fp32")
    for bad in ("fp64", "FP16", None, 16):
        with pytest.raises(ValueError, match="precision"):
            check_precision(bad)
        with pytest.raises(ValueError, match="precision"):
            MixedPrecision(bad)


def test_state_dict_round_trip():
    mp = MixedPrecision("fp16", "cpu", init_scale=2.0**5)
    mp.skipped_steps = 3
    state = mp.state_dict()
    other = MixedPrecision("fp16", "cpu")
    other.load_state_dict(state)
    assert other.scaler.get_scale() == mp.scaler.get_scale() and other.skipped_steps == 3
    with pytest.raises(ValueError, match="precision"):
        MixedPrecision("bf16").load_state_dict(state)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_loop_under_each_precision(precision):
    """The experiments loop with TDLRT: fp32 through MixedPrecision is bit-identical to the loop without
    it; bf16 and fp16 train (finite, decreasing loss) with float32 parameters."""
    from torch.utils.data import DataLoader, TensorDataset

    from tucker_manifold.experiments import train

    def run(mp):
        model = tiny_net(torch.float32)
        opt = TDLRT(model.parameters(), lr=0.05, tau=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(96, 1, 6, 6, generator=g)
        y = (x[:, 0, :3].mean((1, 2)) > 0).long() + (x[:, 0, 3:].mean((1, 2)) > 0).long()
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings():
            warnings.simplefilter("error", SinglePassFallbackWarning)  # the records serve every layer
            hist = train(model, opt, loader, loader, 3, progress=False, precision=mp)
        return model, hist

    model, hist = run(MixedPrecision(precision, "cpu"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    losses = [r["train_loss"] for r in hist]
    assert all(map(lambda v: v == v and abs(v) < 1e3, losses)) and losses[-1] < losses[0]
    if precision == "fp32":
        ref, _ = run(None)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
