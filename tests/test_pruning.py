"""Tests for the pruning baselines (tucker_manifold/pruning.py): SNIP, GraSP, IMP and the accounting."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tucker_manifold import pruning as P
from tucker_manifold.nn import compression_rate
from tucker_manifold.nn.tt import TTConv2d

DT = torch.float64
SEEDS = [0, 1, 2]


def small_cnn(dtype=torch.float32, bn=True, bias=True) -> nn.Sequential:
    layers = [nn.Conv2d(2, 6, 3, padding=1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, bias=bias), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 5)]
    return nn.Sequential(*layers).to(dtype)


def batch(n=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def n_conv_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


def zeros_in(masks) -> int:
    return sum(int((~m).sum()) for m in masks.values())


# ------------------------------------------------------------------------------------ sparsity of masks
@pytest.mark.parametrize("method", ["snip", "grasp", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.873, 0.99])
def test_masks_at_requested_sparsity(method, sparsity):
    torch.manual_seed(0)
    model = small_cnn()
    if method == "snip":
        masks = P.snip_masks(model, batch(), F.cross_entropy, sparsity)
    elif method == "grasp":
        masks = P.grasp_masks(model, batch(), F.cross_entropy, sparsity)
    else:
        masks = P.magnitude_masks(model, sparsity)
    n = n_conv_weights(model)
    assert set(masks) == {"0", "3"}
    assert abs(zeros_in(masks) - sparsity * n) <= 1
    P.apply_masks(model, masks)
    assert abs(P.conv_sparsity(model) * n - sparsity * n) <= 1
    assert type(model[-1]) is nn.Linear and not P.is_pruned(model[-1])  # linear untouched by default


def test_include_linear_prunes_linear_too():
    model = small_cnn()
    masks = P.snip_masks(model, batch(), F.cross_entropy, 0.5, include_linear=True)
    assert set(masks) == {"0", "3", "6"}
    total = n_conv_weights(model) + model[6].weight.numel()
    assert abs(zeros_in(masks) - 0.5 * total) <= 1


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_bad_sparsity_raises(bad):
    model = small_cnn()
    for call in (lambda: P.snip_masks(model, batch(), F.cross_entropy, bad),
                 lambda: P.grasp_masks(model, batch(), F.cross_entropy, bad),
                 lambda: P.magnitude_masks(model, bad),
                 lambda: P.imp_schedule(10, 2, bad)):
        with pytest.raises(ValueError, match="sparsity"):
            call()


# ------------------------------------------------------------------------------------ pruned stays zero
@pytest.mark.parametrize("seed", SEEDS)
def test_pruned_weights_exactly_zero_after_sgd_momentum_weight_decay(seed):
    torch.manual_seed(seed)
    model = small_cnn()
    # Optimizer built BEFORE pruning: prune keeps the Parameter object (renamed weight_orig).
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    masks = P.snip_masks(model, batch(seed=seed), F.cross_entropy, 0.8)
    P.apply_masks(model, masks)
    start = {n: P._weight(m).detach().clone() for n, m in P.prunable_modules(model)}
    for step in range(8):
        x, y = batch(seed=100 + step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for name, m in P.prunable_modules(model):
        w = P._weight(m)
        assert torch.all(w[~masks[name]] == 0)
        assert torch.all(m.weight[~masks[name]] == 0)  # what forward used last
        assert not torch.equal(w[masks[name]], start[name][masks[name]])  # the kept ones trained
    assert abs(P.conv_sparsity(model) - 0.8) * n_conv_weights(model) <= 1


def test_without_masks_the_same_training_revives_zeros():
    # The check above is discriminating: zeroing weights without a mask does not keep them at zero.
    torch.manual_seed(0)
    model = small_cnn()
    masks = P.magnitude_masks(model, 0.8)
    with torch.no_grad():
        for name, m in P.prunable_modules(model):
            m.weight.mul_(masks[name])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(model(batch(seed=step)[0]), batch(seed=step)[1]).backward()
        opt.step()
    assert P.conv_sparsity(model) < 0.1


def test_reapplying_masks_keeps_parameter_and_refreshes_weight():
    model = small_cnn()
    param = model[0].weight
    P.apply_masks(model, P.magnitude_masks(model, 0.3))
    assert model[0].weight_orig is param
    P.apply_masks(model, P.magnitude_masks(model, 0.6))
    assert model[0].weight_orig is param
    assert abs(P.conv_sparsity(model) - 0.6) * n_conv_weights(model) <= 1
    # Weight read before any forward is already the new masked one.
    assert torch.equal(model[0].weight, model[0].weight_orig * model[0].weight_mask)
    # Cumulative magnitude pruning never revives a pruned weight.
    m1 = P.get_masks(model)
    P.apply_masks(model, P.magnitude_masks(model, 0.8))
    for n, m in P.get_masks(model).items():
        assert not torch.any(m & ~m1[n])


def test_apply_masks_bad_input():
    model = small_cnn()
    good = P.magnitude_masks(model, 0.5)
    with pytest.raises(ValueError, match="no module named"):
        P.apply_masks(model, {"nope": good["0"]})
    with pytest.raises(ValueError, match="shape"):
        P.apply_masks(model, {"0": good["3"]})
    with pytest.raises(ValueError, match="0 / 1"):
        P.apply_masks(model, {"0": good["0"].double() * 0.5})
    with pytest.raises(ValueError, match="no weight"):
        P.apply_masks(model, {"2": good["0"]})
    with pytest.raises(ValueError, match="masks"):
        P.apply_masks(model, {})


def test_make_permanent():
    model = small_cnn()
    P.apply_masks(model, P.magnitude_masks(model, 0.5))
    P.make_permanent(model)
    assert not P.is_pruned(model[0]) and isinstance(model[0].weight, nn.Parameter)
    assert abs(P.conv_sparsity(model) - 0.5) * n_conv_weights(model) <= 1


# ------------------------------------------------------------------------------------ SNIP
@pytest.mark.parametrize("seed", SEEDS)
def test_snip_scores_equal_abs_g_times_w_by_hand(seed):
    torch.manual_seed(seed)
    model = small_cnn(DT)
    x, y = batch(dtype=DT, seed=seed)
    bn_before = model[1].running_mean.clone()
    scores = P.snip_scores(model, (x, y), F.cross_entropy)
    assert model[0].weight.grad is None and torch.equal(model[1].running_mean, bn_before)  # caller untouched
    ref = small_cnn(DT)
    ref.load_state_dict(model.state_dict())
    F.cross_entropy(ref(x), y).backward()
    for name in ("0", "3"):
        w = ref.get_submodule(name).weight
        assert torch.allclose(scores[name], (w.grad * w).abs(), atol=1e-15, rtol=0)
    masks = P.snip_masks(model, (x, y), F.cross_entropy, 0.7)
    kept = torch.cat([scores[n][masks[n]] for n in scores])
    cut = torch.cat([scores[n][~masks[n]] for n in scores])
    assert kept.min() >= cut.max()


def test_snip_and_grasp_refuse_a_pruned_model_and_bad_batch():
    model = small_cnn()
    P.apply_masks(model, P.magnitude_masks(model, 0.5))
    with pytest.raises(ValueError, match="already pruned"):
        P.snip_masks(model, batch(), F.cross_entropy, 0.5)
    with pytest.raises(ValueError, match="batch"):
        P.snip_masks(small_cnn(), torch.randn(2, 2, 8, 8), F.cross_entropy, 0.5)
    with pytest.raises(ValueError, match="temperature"):
        P.grasp_masks(small_cnn(), batch(), F.cross_entropy, 0.5, temperature=0)
    with pytest.raises(ValueError, match="prunable"):
        P.snip_masks(nn.Sequential(nn.Flatten(), nn.Linear(128, 5)), batch(), F.cross_entropy, 0.5)


# ------------------------------------------------------------------------------------ GraSP
def _tiny(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Conv2d(3, 2, 2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 16, 3)).to(DT)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_grasp_hg_equals_explicit_hessian_product(seed, temperature):
    model = _tiny(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    hg = P.hessian_gradient_product(model, (x, y), F.cross_entropy, temperature=temperature)
    names = ["0.weight", "2.weight"]
    base = {k: v.detach() for k, v in model.named_parameters()}
    sizes = [base[n].numel() for n in names]

    def loss_of(flat):
        parts = dict(base)
        for n, p in zip(names, torch.split(flat, sizes)):
            parts[n] = p.reshape(base[n].shape)
        return F.cross_entropy(functional_call(model, parts, (x,)) / temperature, y)

    w0 = torch.cat([base[n].reshape(-1) for n in names])
    grad = torch.autograd.functional.jacobian(loss_of, w0)
    hess = torch.autograd.functional.hessian(loss_of, w0)
    explicit = hess @ grad
    ours = torch.cat([hg["0"].reshape(-1), hg["2"].reshape(-1)])
    assert torch.allclose(ours, explicit, atol=1e-12, rtol=1e-10)
    # Central finite difference of the gradient along g: (grad(w + eps g) - grad(w - eps g)) / (2 eps).
    eps = 1e-5
    fd = (torch.autograd.functional.jacobian(loss_of, w0 + eps * grad)
          - torch.autograd.functional.jacobian(loss_of, w0 - eps * grad)) / (2 * eps)
    assert torch.allclose(ours, fd, atol=1e-8 * max(1.0, fd.abs().max().item()))
    # Discriminating: the plain gradient is not Hg.
    assert not torch.allclose(ours, grad, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_grasp_removes_the_largest_minus_w_hg(seed):
    model = _tiny(seed)
    g = torch.Generator().manual_seed(seed)
    data = (torch.randn(5, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g))
    scores = P.grasp_scores(model, data, F.cross_entropy, temperature=2.0)
    hg = P.hessian_gradient_product(model, data, F.cross_entropy, temperature=2.0)
    for n in scores:
        assert torch.allclose(scores[n], -model.get_submodule(n).weight.detach() * hg[n], atol=1e-15)
    masks = P.grasp_masks(model, data, F.cross_entropy, 0.4, temperature=2.0)
    kept = torch.cat([scores[n][masks[n]] for n in scores])
    removed = torch.cat([scores[n][~masks[n]] for n in scores])
    assert removed.min() >= kept.max()  # the paper's convention: high S(-w) is removed


# ------------------------------------------------------------------------------------ IMP
def test_imp_schedule_arithmetic():
    s = P.imp_schedule(30, 3, 0.9, rewind_epoch=1)
    assert (s.round_epochs, s.final_epochs) == (7, 8)
    assert s.rewind_epoch + s.rounds * s.round_epochs + s.final_epochs == 30
    assert s.sparsities[-1] == 0.9 and list(s.sparsities) == sorted(s.sparsities)
    kept = [1.0] + [1 - v for v in s.sparsities]
    ratios = [kept[j + 1] / kept[j] for j in range(3)]
    assert max(ratios) - min(ratios) < 1e-12  # the same fraction of survivors each round
    for e in (5, 6, 17, 100):
        for k in (1, 2, 4):
            if e >= k + 1:
                t = P.imp_schedule(e, k, 0.5, rewind_epoch=0)
                assert t.rounds * t.round_epochs + t.final_epochs == e and t.final_epochs >= t.round_epochs >= 1
    with pytest.raises(ValueError, match="total_epochs"):
        P.imp_schedule(4, 3, 0.9, rewind_epoch=1)
    with pytest.raises(ValueError, match="rounds"):
        P.imp_schedule(10, 0, 0.9)
    with pytest.raises(ValueError, match="rewind_epoch"):
        P.imp_schedule(10, 2, 0.9, rewind_epoch=-1)


@pytest.mark.parametrize("rewind_epoch", [0, 1])
def test_imp_rewinds_survivors_to_the_early_iterate(rewind_epoch):
    torch.manual_seed(0)
    model = small_cnn(DT)
    data = batch(dtype=DT)
    starts, snapshot = [], {}

    def train_fn(m, start_epoch, n_epochs):
        if start_epoch == rewind_epoch and not snapshot:  # the first phase that starts at the rewind point
            snapshot.update({k: v.detach().clone() for k, v in m.state_dict().items()})
        starts.append((start_epoch, {k: v.detach().clone() for k, v in m.state_dict().items()}))
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        m.train()
        for _ in range(n_epochs * 2):
            opt.zero_grad()
            F.cross_entropy(m(data[0]), data[1]).backward()
            opt.step()
        return n_epochs

    res = P.run_imp(model, train_fn, 0.85, total_epochs=9, rounds=3, rewind_epoch=rewind_epoch)
    assert [p["phase"] for p in res.phases] == (["to_rewind_point"] if rewind_epoch else []) + \
        ["round_1", "round_2", "round_3", "final"]
    assert sum(p["epochs"] for p in res.phases) == 9
    later = [sd for e, sd in starts if e == rewind_epoch][1:]  # phases after a rewind
    assert len(later) == 3
    for sd in later:
        for key, val in sd.items():
            if key.endswith("weight_mask"):
                continue
            src = key[: -len("_orig")] if key.endswith("_orig") else key
            if key.endswith("weight_orig"):
                mask = sd[key[: -len("_orig")] + "_mask"].bool()
                assert torch.equal(val[mask], snapshot[src][mask])  # surviving weights rewound exactly
            else:
                assert torch.equal(val, snapshot[src])  # biases, BatchNorm weights and statistics too
    assert abs(P.conv_sparsity(model) - 0.85) * n_conv_weights(model) <= 1
    assert set(res.masks) == {"0", "3"}
    # The trained final weights differ from the rewind point (the final phase trained them).
    assert not torch.equal(P._weight(model[0]), snapshot["0.weight"] * model[0].weight_mask)


def test_imp_bad_input():
    with pytest.raises(ValueError, match="train_fn"):
        P.run_imp(small_cnn(), None, 0.5, 10)
    with pytest.raises(ValueError, match="total_epochs"):
        P.run_imp(small_cnn(), lambda m, s, n: None, 0.5, 2, rounds=3)
    pruned = small_cnn()
    P.apply_masks(pruned, P.magnitude_masks(pruned, 0.5))
    with pytest.raises(ValueError, match="already pruned"):
        P.run_imp(pruned, lambda m, s, n: None, 0.5, 10)


# ------------------------------------------------------------------------------------ accounting
def test_pruned_counts_and_compression_rate():
    model = small_cnn()
    dense = compression_rate(model)
    assert P.pruned_compression_rate(model) == dense  # unpruned: the same numbers
    assert P.pruned_parameter_count(model) == sum(p.numel() for p in model.parameters())
    s = P.sparsity_for_conv_compression(model, 0.7)
    P.apply_masks(model, P.magnitude_masks(model, s))
    r = P.pruned_compression_rate(model)
    assert abs(r["conv"] - 0.7) * r["conv_dense_params"] <= 1
    assert r["conv_dense_params"] == dense["conv_dense_params"]
    nnz, total = P.conv_weight_counts(model)
    biases = model[0].bias.numel() + model[3].bias.numel()
    assert r["conv_params"] == nnz + biases and total == n_conv_weights(model)
    assert P.pruned_parameter_count(model) == dense["total_params"] - (total - nnz)
    with pytest.raises(ValueError, match="compression"):
        P.sparsity_for_conv_compression(small_cnn(), 1.0)
    # A model whose biases alone exceed the target: the needed sparsity reaches 1.
    tiny = nn.Sequential(nn.Conv2d(1, 4, 1))  # 4 weights + 4 biases
    with pytest.raises(ValueError, match="every conv weight"):
        P.sparsity_for_conv_compression(tiny, 0.6)


def test_dense_equivalent_flops_by_hand():
    model = small_cnn()
    model.train()
    before = model[1].running_mean.clone()
    f = P.dense_equivalent_flops(model, (2, 2, 8, 8))
    # conv0: 6 out ch x 8x8 positions x (2*9) per output; conv3: 8 x 3x3 x (6*9); linear: 5 x 72.
    macs = 2 * (6 * 64 * 18 + 8 * 9 * 54 + 5 * 72)
    assert f == 2 * macs
    assert model.training and model[1].training and torch.equal(model[1].running_mean, before)
    P.apply_masks(model, P.magnitude_masks(model, 0.5))
    assert P.dense_equivalent_flops(model, (2, 2, 8, 8)) == f  # zeros cost the same in a dense kernel
    nnz0 = int(model[0].weight_mask.sum())
    nnz3 = int(model[3].weight_mask.sum())
    sparse = P.dense_equivalent_flops(model, (1, 2, 8, 8), skip_zeros=True)
    assert sparse == 2 * (64 * nnz0 + 9 * nnz3 + 5 * 72)
    # Factorized layers count as their dense equivalent.
    tt = nn.Sequential(TTConv2d(2, 6, 3, ranks=2, padding=1))
    assert P.dense_equivalent_flops(tt, (1, 2, 8, 8)) == 2 * 6 * 64 * 18
    with pytest.raises(ValueError, match="input_shape"):
        P.dense_equivalent_flops(model, (0, 2, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        P.dense_equivalent_flops(model, 5)


def test_global_masks_from_scores_ties_and_nan():
    scores = {"a": torch.zeros(3, 2), "b": torch.zeros(4)}
    m = P.global_masks_from_scores(scores, 0.5)
    # Ties: the earlier entries are kept (the first 5 of the 10, in dict then row-major order).
    assert zeros_in(m) == 5 and m["a"].reshape(-1)[:5].all() and not m["a"].reshape(-1)[5] and not m["b"].any()
    with pytest.raises(ValueError, match="NaN"):
        P.global_masks_from_scores({"a": torch.tensor([1.0, math.nan])}, 0.5)


def test_pruned_compression_rate_agrees_with_compression_rate_on_factorized_models():
    from tucker_manifold.nn import factorize_model, tuckerize

    torch.manual_seed(0)
    for model in (tuckerize(small_cnn(), rank_fraction=0.5), factorize_model(small_cnn(), "cp", rank=3),
                  nn.Sequential(TTConv2d(2, 6, 3, ranks=2))):
        assert P.pruned_compression_rate(model) == compression_rate(model)


def test_pruned_model_deepcopies_pickles_and_round_trips_state_dict():
    import copy
    import io

    torch.manual_seed(0)
    model = small_cnn()
    P.apply_masks(model, P.magnitude_masks(model, 0.7))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()  # after a forward, prune alone leaves a non-leaf `weight`
    opt.step()
    twin = copy.deepcopy(model)
    model.eval(), twin.eval()
    assert torch.equal(twin(x), model(x)) and P.get_masks(twin).keys() == P.get_masks(model).keys()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = small_cnn()
    P.apply_masks(fresh, P.magnitude_masks(fresh, 0.1))  # same structure (weight_orig / weight_mask keys)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    assert abs(P.conv_sparsity(fresh) - 0.7) * n_conv_weights(fresh) <= 1
    # Gradients still reach weight_orig through the forward (the detach happens after it).
    fresh.train()
    F.cross_entropy(fresh(x), y).backward()
    assert fresh[0].weight_orig.grad is not None and torch.all(fresh[0].weight_orig.grad[~fresh[0].weight_mask.bool()] == 0)
    P.make_permanent(fresh)
    assert not fresh[0]._forward_hooks
