"""WideMLP for bag-of-words text classification and the small MLP of the XOR toy task."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _SparseBagMean(torch.autograd.Function):
    """``F.embedding_bag(ids, weight, offsets, mode="mean")`` whose weight gradient is a coalesced sparse tensor
    over the batch's distinct ids, computed as one (distinct ids x bags) @ (bags x dim) product."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(ids, offsets)
        ctx.num_rows = weight.shape[0]
        return torch.nn.functional.embedding_bag(ids, weight, offsets, mode="mean")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        ids, offsets = ctx.saved_tensors
        lengths = torch.diff(offsets, append=offsets.new_tensor([ids.numel()]))
        bag = torch.repeat_interleave(torch.arange(offsets.numel(), device=ids.device), lengths)
        rows, inverse = torch.unique(ids, return_inverse=True)
        share = torch.zeros(rows.numel(), offsets.numel(), dtype=grad.dtype, device=grad.device)
        share.index_put_((inverse, bag), (1.0 / lengths.clamp(min=1)).to(grad.dtype)[bag], accumulate=True)
        return torch.sparse_coo_tensor(rows[None], share @ grad, (ctx.num_rows, grad.shape[1]),
                                       is_coalesced=True, check_invariants=False), None, None


class BagMean(nn.EmbeddingBag):
    """`nn.EmbeddingBag` in mean mode; with ``sparse=True`` its sparse weight gradient is computed as one small
    matrix product and comes coalesced, several times faster than torch's per-occurrence sparse backward."""

    def __init__(self, num_embeddings: int, embedding_dim: int, sparse: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim, mode="mean", sparse=sparse)

    def forward(self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
        if self.sparse and input.dim() == 1 and offsets is not None and per_sample_weights is None \
                and self.weight.requires_grad and torch.is_grad_enabled():
            return _SparseBagMean.apply(self.weight, input, offsets)
        return super().forward(input, offsets, per_sample_weights)


class WideMLP(nn.Module):
    """Bag of words -> mean of word vectors (width ``hidden``) -> ReLU -> dropout -> Linear to classes.

    Input: the token ids of a batch of documents, concatenated (``ids``), and each document's start in it
    (``offsets``), as for `nn.EmbeddingBag`.

    Args:
        input_layer: "embedding" (default): an `nn.EmbeddingBag` (mode "mean"; a `BagMean`, whose sparse
            gradient is faster), which `tritium.quantize` leaves in full precision, so only the output layer
            is quantized, as in the paper.
            "linear": an `nn.Linear(vocab_size, hidden)` applied to each document's mean one-hot vector
            (the same function, plus a bias), which `tritium.quantize` converts too. It materialises a
            (batch, vocab_size) input, so it is slower.
    """

    def __init__(self, vocab_size: int, num_classes: int, hidden: int = 1024, dropout: float = 0.5,
                 input_layer: str = "embedding") -> None:
        super().__init__()
        if input_layer not in ("embedding", "linear"):
            raise ValueError(f"input_layer={input_layer!r}: choose 'embedding' or 'linear'")
        self.vocab_size, self.input_layer = vocab_size, input_layer
        if input_layer == "embedding":
            self.embed = BagMean(vocab_size, hidden)
        else:
            self.embed = nn.Linear(vocab_size, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_classes)

    def bag(self, ids: Tensor, offsets: Tensor) -> Tensor:
        """Each document's mean one-hot vector, shape (batch, vocab_size)."""
        n = offsets.numel()
        lengths = torch.diff(offsets, append=offsets.new_tensor([ids.numel()]))
        doc = torch.repeat_interleave(torch.arange(n, device=ids.device), lengths)
        x = torch.zeros(n, self.vocab_size, device=ids.device)
        x.index_put_((doc, ids), (1.0 / lengths.clamp(min=1))[doc], accumulate=True)
        return x

    def forward(self, ids: Tensor, offsets: Tensor) -> Tensor:
        h = self.embed(ids, offsets) if self.input_layer == "embedding" else self.embed(self.bag(ids, offsets))
        return self.out(self.dropout(torch.relu(h)))


class XorMLP(nn.Module):
    """Two-layer MLP: Linear(in, hidden) -> ReLU -> Linear(hidden, classes)."""

    def __init__(self, in_features: int = 4, hidden: int = 8, num_classes: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))
