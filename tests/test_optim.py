import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tritium import kernels
from tritium.models import WideMLP
from tritium.optim import LazyAdamW

native = pytest.mark.skipif(not kernels.has_lazy_adamw(), reason="compiled kernels unavailable")
LR, BETAS, EPS, WD = 0.05, (0.9, 0.999), 1e-8, 0.1


def reference_adamw(p0: np.ndarray, grads: list[np.ndarray], lrs: list[float]) -> np.ndarray:
    """AdamW on dense gradients, every element every step, one float32 operation at a time."""
    f = np.float32
    b1, b2 = f(BETAS[0]), f(BETAS[1])
    c1, c2 = f(1 - BETAS[0]), f(1 - BETAS[1])
    p, m, v = p0.astype(f), np.zeros_like(p0, dtype=f), np.zeros_like(p0, dtype=f)
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), 1):
        a = f(1 - lr * WD)
        st = f(lr / (1 - BETAS[0] ** t))
        ibc = f(1 / math.sqrt(1 - BETAS[1] ** t))
        p = p * a
        m = m * b1 + c1 * g
        v = v * b2 + (c2 * g) * g
        p = p - (st * m) / (np.sqrt(v) * ibc + f(EPS))
    return p


def sparse_problem(steps: int, rows: int = 12, width: int = 70, seed: int = 0):
    """Random gradients in which each row is present with probability 0.3 at each step."""
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(rows, width, generator=g)
    grads = [torch.randn(rows, width, generator=g) * (torch.rand(rows, 1, generator=g) < 0.3) for _ in range(steps)]
    return p0, grads


def as_sparse(g: torch.Tensor) -> torch.Tensor:
    idx = g.abs().sum(1).nonzero()[:, 0]
    return torch.sparse_coo_tensor(idx[None], g[idx], g.shape, check_invariants=True)


def run_lazy(p0, grads, sparse: bool, lazy: bool = True, lrs=None) -> tuple[torch.Tensor, LazyAdamW]:
    p = torch.nn.Parameter(p0.clone())
    opt = LazyAdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, lazy=lazy)
    opt._watched.add(id(p))  # the gradients are set by hand: nothing reads stale rows in between
    for t, g in enumerate(grads):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[t]
        p.grad = as_sparse(g) if sparse else g.clone()
        opt.step()
    opt.sync()
    return p.detach(), opt


@native
@pytest.mark.parametrize("sparse", [True, False])
def test_lazy_rows_bit_exact_against_dense_float32_reference(sparse):
    # 80 steps: past the 64 preallocated per-step constants; a varying learning rate as under a schedule
    p0, grads = sparse_problem(80)
    lrs = [LR * (1 - t / 100) for t in range(80)]
    got, _ = run_lazy(p0, grads, sparse, lrs=lrs)
    want = reference_adamw(p0.numpy(), [g.numpy() for g in grads], lrs)
    assert np.array_equal(got.numpy(), want)


def test_eager_mode_bit_exact_against_reference():
    p0, grads = sparse_problem(20, seed=1)
    got, opt = run_lazy(p0, grads, sparse=True, lazy=False)
    assert not opt.lazy
    assert np.array_equal(got.numpy(), reference_adamw(p0.numpy(), [g.numpy() for g in grads], [LR] * 20))


def test_close_to_torch_adamw():
    p0, grads = sparse_problem(30, seed=2)
    got, _ = run_lazy(p0, grads, sparse=True)
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6)


def train_widemlp(lazy: bool, sparse: bool, steps: int = 12) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = WideMLP(30, 3, hidden=16, dropout=0.0)
    model.embed.sparse = sparse
    if sparse:
        opt = LazyAdamW(model.parameters(), lr=0.01, weight_decay=0.01, lazy=lazy)
        opt.watch(model)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 20)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids, offsets = torch.randint(0, 30, (14,), generator=g), torch.tensor([0, 4, 9])
        loss = F.cross_entropy(model(ids, offsets), torch.tensor([0, 1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    if sparse:
        opt.sync()
    return [p.detach().clone() for p in model.parameters()]


def test_watched_embedding_training_equals_eager_and_adamw():
    lazy, eager, dense = train_widemlp(True, True), train_widemlp(False, True), train_widemlp(False, False)
    for a, b, c in zip(lazy, eager, dense, strict=True):
        if kernels.has_lazy_adamw():
            assert torch.equal(a, b)  # rows caught up before each forward read them: same numbers
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@native
def test_unwatched_sparse_parameter_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = LazyAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="watch"):
        opt.step()
    assert not opt.state  # refused before any state was touched


@native
def test_sync_of_some_rows_and_state_dict_round_trip():
    p0, grads = sparse_problem(10, seed=3)
    want, _ = run_lazy(p0, grads, sparse=True)
    p = torch.nn.Parameter(p0.clone())
    opt = LazyAdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    opt._watched.add(id(p))
    for g in grads[:5]:
        p.grad = as_sparse(g)
        opt.step()
    opt.sync(p, torch.tensor([[3, 3], [0, 11]]))  # any shape, repeats allowed
    assert opt.state[p]["last"][[0, 3, 11]].tolist() == [5, 5, 5]
    saved = opt.state_dict()  # syncs every row
    assert bool((opt.state[p]["last"] == 5).all())
    q = torch.nn.Parameter(p.detach().clone())
    resumed = LazyAdamW([q], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    resumed.load_state_dict(saved)
    resumed._watched.add(id(q))
    for g in grads[5:]:
        q.grad = as_sparse(g)
        resumed.step()
    resumed.sync()
    assert torch.equal(q.detach(), want)


def test_parameter_without_gradient_is_skipped_and_bad_parameters_refused():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = LazyAdamW([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    assert bool((a.detach() < 1).all())
    half = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    half.grad = torch.ones(3, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32"):
        LazyAdamW([half]).step()
    with pytest.raises(ValueError, match="betas"):
        LazyAdamW([a], betas=(0.9, 1.0))


@native
def test_kernel_refuses_bad_rows_without_changing_anything():
    p, m, v = torch.randn(4, 8), torch.zeros(4, 8), torch.zeros(4, 8)
    last, consts = torch.zeros(4, dtype=torch.int64), torch.ones(3, 4)
    before = p.clone()
    for rows in ([2, 1], [1, 1], [0, 4], [-1]):
        r = torch.tensor(rows)
        with pytest.raises(ValueError, match="sorted, distinct"):
            kernels.lazy_adamw_rows(p, m, v, last, r, torch.ones(len(rows), 8), 1, consts, BETAS, EPS)
    last[1] = 1
    with pytest.raises(ValueError):  # row 1 is already at step 1
        kernels.lazy_adamw_rows(p, m, v, last, torch.tensor([1]), torch.ones(1, 8), 1, consts, BETAS, EPS)
    assert torch.equal(p, before) and last.tolist() == [0, 1, 0, 0]
    with pytest.raises(TypeError, match="float32"):
        kernels.lazy_adamw_rows(p.double(), m, v, last, torch.tensor([0]), None, 1, consts, BETAS, EPS)


@native
def test_subnormal_moments_are_flushed_to_zero():
    # row 0 gets one tiny gradient, then sits out 300 steps: its first moment decays by b1 at every step
    # into the subnormal range, where the kernel flushes it to zero (the weights are unaffected)
    p0 = torch.ones(2, 16)
    grads = [torch.full((2, 16), 1e-30)] + [torch.tensor([[0.0], [1.0]]).expand(2, 16).clone()] * 300
    got, opt = run_lazy(p0, grads, sparse=True)
    m = np.float32(1e-30) * np.float32(1 - BETAS[0])
    for _ in range(300):
        m = m * np.float32(BETAS[0])
    assert 0 < m < np.finfo(np.float32).tiny  # subnormal without the flush
    assert bool((opt.state_dict()["state"][0]["exp_avg"][0] == 0).all())
    assert np.array_equal(got.numpy(), reference_adamw(p0.numpy(), [g.numpy() for g in grads], [LR] * 301))
