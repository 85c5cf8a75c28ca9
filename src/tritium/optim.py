"""LazyAdamW: AdamW that touches only the embedding rows a step uses, with AdamW's result.

Training a model with a large embedding (a bag-of-words WideMLP has a 31 M parameter one on 20ng) spends
most of each step in the optimizer: AdamW updates every row at every step, also the rows whose gradient is
zero, because their moments decay and their weights move. Those zero-gradient updates depend only on the
row's own state and the step's constants, so `LazyAdamW` applies them later, just before a forward reads
the row (or at `LazyAdamW.sync`), as one pass over the row that keeps it in registers
(`tritium.kernels.lazy_adamw_rows`). The float32 operations are the same, in the same order, as updating
every row at every step (`LazyAdamW(..., lazy=False)`), so the two agree bit for bit, except that the
kernel flushes subnormal numbers (below 1.2e-38, as a long-unused row's first moment becomes) to zero.

    opt = LazyAdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    opt.watch(model)  # embeddings with sparse=True: rows are brought up to date before each forward
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from . import kernels


class LazyAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose skipped zero-gradient row updates are applied when needed.

    A parameter with a sparse gradient (``nn.Embedding`` / ``nn.EmbeddingBag`` with ``sparse=True``) gets,
    at each step, AdamW's update for the rows in the gradient; the rows not in it (zero gradient) are
    brought up to date when a forward of the module next reads them (hooks registered by `watch`, which
    such a module needs) or by `sync`. Dense gradients update the whole parameter every step. The
    arithmetic per element and step is AdamW's, in float32 (the constants computed in float64)::

        p = p * (1 - lr * wd);  m = m * b1 + (1 - b1) * g;  v = v * b2 + ((1 - b2) * g) * g
        p = p - (lr / (1 - b1^t) * m) / (sqrt(v) * (1 / sqrt(1 - b2^t)) + eps)

    It equals `torch.optim.AdamW` up to float rounding (tested) and ``lazy=False`` bit for bit (but for
    subnormal moments, which the kernel flushes to zero).

    Rows that no forward has read since their last update hold stale values until `sync`: call it before
    saving or inspecting the parameters (`state_dict` syncs first). Parameters must be float32 on the CPU;
    a parameter with no gradient in a step is skipped, as by `torch.optim.AdamW`.

    Args:
        lazy: False updates every row at every step with PyTorch operations (the reference, and what runs
            when the compiled kernels are unavailable).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, lazy: bool = True) -> None:
        if not lr >= 0.0:
            raise ValueError(f"LazyAdamW: lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"LazyAdamW: betas must be two numbers in [0, 1), got {betas}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"LazyAdamW: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.lazy = lazy and kernels.has_lazy_adamw()
        self._watched: set[int] = set()

    def watch(self, model: torch.nn.Module) -> list:
        """Bring the rows of every sparse ``nn.Embedding`` / ``nn.EmbeddingBag`` in ``model`` up to date just
        before its forward reads them (a forward pre-hook); returns the hook handles."""
        handles = []
        for module in model.modules():
            if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse:
                def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                    self.sync(mod.weight, args[0] if args else kwargs["input"])

                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                self._watched.add(id(module.weight))
        return handles

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            if p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous():
                raise TypeError(f"LazyAdamW: parameters must be contiguous float32 CPU tensors, got a {p.dtype} "
                                f"{tuple(p.shape)} tensor on {p.device}")
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["last"] = torch.zeros(_rows(p), dtype=torch.int64)  # the step each row is at
            state["consts"] = torch.zeros(3, 64)  # per step: 1 - lr * wd, lr / (1 - b1^t), 1 / sqrt(1 - b2^t)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step on every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (b1, b2), eps = group["betas"], group["eps"]
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_grad(p, p.grad)
                state = self._state(p)
                t = state["step"] = state["step"] + 1
                if state["consts"].shape[1] <= t:
                    grown = torch.zeros(3, 2 * state["consts"].shape[1])
                    grown[:, : state["consts"].shape[1]] = state["consts"]
                    state["consts"] = grown
                state["consts"][:, t] = torch.tensor(
                    [1.0 - lr * wd, lr / (1.0 - b1 ** t), 1.0 / math.sqrt(1.0 - b2 ** t)], dtype=torch.float64)
                self._update(p, p.grad, state, (b1, b2), eps)
        return loss

    def _check_grad(self, p: Tensor, grad: Tensor) -> None:
        if grad.shape != p.shape:
            raise ValueError(f"LazyAdamW: a gradient of shape {tuple(grad.shape)} for a parameter {tuple(p.shape)}")
        if not grad.is_sparse:
            return
        if grad.sparse_dim() != 1:
            raise ValueError(f"LazyAdamW: a sparse gradient must be sparse in dim 0 only, got {grad.sparse_dim()} "
                             f"sparse dims for a parameter {tuple(p.shape)}")
        if self.lazy and id(p) not in self._watched:
            raise RuntimeError(f"LazyAdamW: a parameter {tuple(p.shape)} has a sparse gradient but its module "
                               "is not watched: call opt.watch(model) before training, so that its rows are "
                               "brought up to date before a forward reads them")

    def _update(self, p: Tensor, grad: Tensor, state: dict, betas: tuple[float, float], eps: float) -> None:
        t, (rows_total, width) = state["step"], (_rows(p), p.numel() // max(_rows(p), 1))
        views = [x.view(rows_total, width) for x in (p, state["exp_avg"], state["exp_avg_sq"])]
        if grad.is_sparse:
            rows, values = grad._indices()[0], grad._values()
            if not (grad.is_coalesced() or rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all())):
                grad = grad.coalesce()  # (BagMean's gradient comes with distinct sorted rows already)
                rows, values = grad.indices()[0], grad.values()
            values = values.reshape(-1, width).to(torch.float32).contiguous()
        else:
            rows, values = torch.arange(rows_total), grad.reshape(rows_total, width).to(torch.float32).contiguous()
        if self.lazy:
            kernels.lazy_adamw_rows(*views, state["last"], rows, values, t, state["consts"], betas, eps)
            return
        dense = values if not grad.is_sparse else torch.zeros(rows_total, width).index_copy_(0, rows, values)
        _eager_step(*views, dense, state["consts"][:, t].tolist(), betas, eps)
        state["last"].fill_(t)

    @torch.no_grad()
    def sync(self, param: Tensor | None = None, rows: Tensor | None = None) -> None:
        """Apply the pending zero-gradient updates: of every parameter, or of ``param`` only, and there of the
        ``rows`` only (indices along dim 0, any shape, repeats allowed), so that they are at their current step."""
        if not self.lazy:
            return
        for group in self.param_groups:
            betas, eps = group["betas"], group["eps"]
            for p in group["params"]:
                state = self.state.get(p)
                if (param is not None and p is not param) or not state:
                    continue
                r = _rows(p)
                todo = torch.arange(r) if rows is None else rows.reshape(-1).to(torch.int64).unique()
                views = [x.view(r, -1) for x in (p, state["exp_avg"], state["exp_avg_sq"])]
                kernels.lazy_adamw_rows(*views, state["last"], todo, None, state["step"], state["consts"],
                                        betas, eps)

    def state_dict(self) -> dict:
        """The optimizer state after `sync` (so that it matches the synced parameters)."""
        self.sync()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from `state_dict` (every row at its parameter's step)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts every tensor but "step" to the parameter's dtype
            if "last" in state:
                state["last"] = torch.full(state["last"].shape, state["step"], dtype=torch.int64)


def _rows(p: Tensor) -> int:
    """Rows of the lazy update: dim 0 of a matrix (the embedding's vocabulary), one row otherwise."""
    return p.shape[0] if p.dim() >= 2 else 1


def _f32(x: float) -> float:
    """``x`` rounded to float32, as the kernel sees it."""
    return float(torch.tensor(float(x), dtype=torch.float32))


def _eager_step(p: Tensor, m: Tensor, v: Tensor, g: Tensor, consts: list[float], betas: tuple[float, float],
                eps: float) -> None:
    """The AdamW step of every row, with the kernel's float32 operations in the kernel's order (the square
    root through float64, since torch's float32 one is not always correctly rounded; C's ``sqrtf`` is)."""
    (a, st, ibc), (b1, b2), (c1, c2) = consts, (_f32(b) for b in betas), (_f32(1.0 - b) for b in betas)
    eps = _f32(eps)
    p.mul_(a)
    m.mul_(b1).add_(g * c1)
    v.mul_(b2).add_((g * c2) * g)
    p.sub_((m * st) / (v.double().sqrt().float() * ibc + eps))
