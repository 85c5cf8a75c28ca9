"""Graph neural networks from PyTorch Geometric layers: SGC and a two-layer GCN."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GCNConv, SGConv


class SGC(nn.Module):
    """Simple graph convolution (Wu et al., 2019): ``K`` propagation steps, then one linear layer."""

    def __init__(self, in_features: int, num_classes: int, k: int = 2) -> None:
        super().__init__()
        self.conv = SGConv(in_features, num_classes, K=k, cached=True)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.conv(x, edge_index)


class GCN(nn.Module):
    """Two-layer GCN (Kipf & Welling, 2017): dropout -> GCNConv -> ReLU -> dropout -> GCNConv."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 16, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = GCNConv(in_features, hidden, cached=True)
        self.conv2 = GCNConv(hidden, num_classes, cached=True)
        self.p = dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = F.dropout(x, self.p, self.training)
        x = F.relu(self.conv1(x, edge_index))
        x = F.dropout(x, self.p, self.training)
        return self.conv2(x, edge_index)
