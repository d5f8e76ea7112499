"""The Tucker-parameter contract (tucker_manifold.parameter): declared bounds, one way to set a point,
the core-only-gradient context, copies and pickles."""
import copy
import io
import pickle

import geoopt
import pytest
import torch

from tucker_manifold import FixedRankTucker
from tucker_manifold.parameter import (
    RankBounds,
    TuckerParameter,
    core_grad_only,
    factor_grads_wanted,
    is_tucker_parameter,
    make_tucker_parameter,
    rank_bounds,
    set_point,
    tucker_manifold,
)

DT = torch.float64


def _param(shape=(5, 4, 3), ranks=(2, 2, 2), seed=0, bounds=None, dtype=DT):
    m = tucker_manifold(shape, ranks)
    return make_tucker_parameter(m.random(dtype=dtype, generator=torch.Generator().manual_seed(seed)), m, bounds)


# ------------------------------------------------------------------------------------ RankBounds
def test_rank_bounds_validation_and_full():
    b = RankBounds.full((5, 4, 3), adaptive=(True, False, True))
    assert b == RankBounds((1, 1, 1), (5, 4, 3), (True, False, True))
    assert RankBounds.full((2, 3)).adaptive == (True, True)
    with pytest.raises(ValueError, match="one entry per mode"):
        RankBounds((1, 1), (2, 2, 2), (True, True))
    with pytest.raises(ValueError, match="mode 1"):
        RankBounds((1, 3), (2, 2), (True, True))
    with pytest.raises(ValueError, match="mode 0"):
        RankBounds((0, 1), (2, 2), (True, True))


def test_rank_bounds_overrides_touch_adaptive_modes_only():
    b = RankBounds((1, 1, 2, 1), (16, 8, 3, 3), (True, True, False, False))
    assert b.with_overrides((16, 8, 3, 3), rmin=3, rmax=6) == RankBounds((3, 3, 2, 1), (6, 6, 3, 3), b.adaptive)
    # rmax clamped to n_i, rmin never above rmax
    assert b.with_overrides((16, 8, 3, 3), rmin=10) == RankBounds((10, 8, 2, 1), (16, 8, 3, 3), b.adaptive)
    assert b.with_overrides((16, 8, 3, 3)) == b


# ------------------------------------------------------------------------------------ construction
def test_make_tucker_parameter_shares_data_and_checks_arguments():
    m = tucker_manifold((5, 4, 3), (2, 2, 2))
    x = m.random(dtype=DT)
    p = make_tucker_parameter(x, m)
    assert isinstance(p, TuckerParameter) and isinstance(p, geoopt.ManifoldParameter) and p.requires_grad
    assert p.manifold is m and p.bounds == RankBounds.full((5, 4, 3))
    assert p.data_ptr() == x.data_ptr()  # not copied
    assert not make_tucker_parameter(x, m, requires_grad=False).requires_grad
    with pytest.raises(ValueError, match="manifold"):
        make_tucker_parameter(x, geoopt.Euclidean())
    with pytest.raises(ValueError, match="packed"):
        make_tucker_parameter(x[:-1], m)
    with pytest.raises(ValueError, match="bounds"):
        make_tucker_parameter(x, m, RankBounds.full((5, 4)))


def test_is_tucker_parameter_and_rank_bounds():
    p = _param(bounds=RankBounds((1, 2, 1), (3, 4, 3), (True, True, False)))
    m = p.manifold
    bare = geoopt.ManifoldParameter(m.random(dtype=DT), manifold=m)
    assert is_tucker_parameter(p) and is_tucker_parameter(bare)
    assert not is_tucker_parameter(torch.nn.Parameter(torch.zeros(3)))
    assert not is_tucker_parameter(geoopt.ManifoldParameter(torch.zeros(3), manifold=geoopt.Euclidean()))
    assert rank_bounds(p) == RankBounds((1, 2, 1), (3, 4, 3), (True, True, False))
    assert rank_bounds(bare) == RankBounds.full(m.shape)


def test_tucker_manifold_is_cached():
    assert tucker_manifold((5, 4, 3), (2, 2, 2)) is tucker_manifold((5, 4, 3), (2, 2, 2))
    assert tucker_manifold((5, 4, 3), (2, 2, 2)) is not tucker_manifold((5, 4, 3), (2, 2, 1))
    with pytest.raises(ValueError, match="ranks"):
        tucker_manifold((5, 4, 3), (5, 1, 1))


# ------------------------------------------------------------------------------------ set_point
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_set_point_replaces_data_and_manifold_in_place(seed):
    p = _param(seed=seed)
    p.grad = torch.ones_like(p)
    m2 = FixedRankTucker((5, 4, 3), (3, 2, 2))
    core, factors = m2.unpack(m2.random(dtype=DT, generator=torch.Generator().manual_seed(seed + 10)))
    pid = id(p)
    set_point(p, core, factors)
    assert id(p) == pid and p.grad is None
    assert p.manifold is tucker_manifold((5, 4, 3), (3, 2, 2)) and p.shape == (m2.packed_size,)
    assert torch.equal(p.detach(), m2.pack(core, factors))
    core.zero_()  # copied
    assert p.abs().sum() > 0
    # an explicit manifold object is kept
    set_point(p, *m2.unpack(p.detach()), manifold=m2)
    assert p.manifold is m2


def test_set_point_casts_and_rejects_mismatches():
    p = _param(dtype=torch.float32)
    m = p.manifold
    core, factors = m.unpack(m.random(dtype=DT))
    set_point(p, core, factors)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.detach(), m.pack(core, factors).float())
    with pytest.raises(ValueError, match="shape"):
        set_point(p, core, [f[:-1] for f in factors])
    with pytest.raises(ValueError, match="manifold"):
        set_point(p, core, factors, manifold=FixedRankTucker((5, 4, 3), (3, 2, 2)))
    with pytest.raises(ValueError, match="Tucker"):
        set_point(torch.nn.Parameter(torch.zeros(3)), core, factors)


# ------------------------------------------------------------------------------------ copies
def test_deepcopy_and_pickle_keep_manifold_and_bounds():
    bounds = RankBounds((1, 2, 1), (3, 4, 3), (True, True, False))
    p = _param(bounds=bounds)
    p.requires_grad_(False)
    buf = io.BytesIO()
    pickle.dump(p, buf)
    buf.seek(0)
    for q in [copy.deepcopy(p), pickle.load(buf)]:
        assert isinstance(q, TuckerParameter) and q is not p
        assert q.bounds == bounds and q.manifold.ranks == p.manifold.ranks and not q.requires_grad
        assert torch.equal(q.detach(), p.detach()) and q.data_ptr() != p.data_ptr()
    # deepcopy keeps identity within one copy (memo)
    a, b = copy.deepcopy([p, p])
    assert a is b


# ------------------------------------------------------------------------------------ core-only context
def test_core_grad_only_context():
    p, q = _param(seed=0), _param(seed=1)
    assert factor_grads_wanted(p) and factor_grads_wanted(q)
    with core_grad_only([p]):
        assert not factor_grads_wanted(p) and factor_grads_wanted(q)
        with core_grad_only([q]):
            assert not factor_grads_wanted(p) and not factor_grads_wanted(q)
        assert not factor_grads_wanted(p) and factor_grads_wanted(q)
    assert factor_grads_wanted(p)
    with pytest.raises(RuntimeError, match="boom"):
        with core_grad_only([p, q]):
            raise RuntimeError("boom")
    assert factor_grads_wanted(p) and factor_grads_wanted(q)  # restored after an exception
    with core_grad_only([]):
        assert factor_grads_wanted(p)
