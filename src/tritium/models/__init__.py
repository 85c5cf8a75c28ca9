"""Small models of the paper reproductions; convert them with `tritium.quantize` like any model."""

from .mlp import WideMLP, XorMLP

__all__ = ["WideMLP", "XorMLP", "SGC", "GCN"]


def __getattr__(name: str):
    if name in ("SGC", "GCN"):  # torch_geometric is imported only when asked for
        from . import gnn

        return getattr(gnn, name)
    raise AttributeError(name)
