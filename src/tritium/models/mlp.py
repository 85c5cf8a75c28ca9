"""WideMLP for bag-of-words text classification and the small MLP of the XOR toy task."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WideMLP(nn.Module):
    """Bag of words -> mean of word vectors (width ``hidden``) -> ReLU -> dropout -> Linear to classes.

    Input: the token ids of a batch of documents, concatenated (``ids``), and each document's start in it
    (``offsets``), as for `nn.EmbeddingBag`.

    Args:
        input_layer: "embedding" (default): an `nn.EmbeddingBag` (mode "mean"), which `tritium.quantize`
            leaves in full precision, so only the output layer is quantized, as in the paper.
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
            self.embed = nn.EmbeddingBag(vocab_size, hidden, mode="mean")
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
