"""Text classification data in the text_gcn layout, tokenised once into index tensors.

Layout under the data root: ``text_gcn/data/<name>.txt`` (one line per document, ``id<TAB>split<TAB>label``;
a split containing "train" or "test") and ``text_gcn/data/corpus/<name>.txt`` (one document per line,
same order). Words are lowercased runs of letters and digits; the vocabulary comes from the training
documents (validation documents excluded) only.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from . import DataNotFoundError, data_root

SOURCE = "https://github.com/yao8839836/text_gcn (data/<name>.txt and data/corpus/<name>.txt)"
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens: maximal runs of ASCII letters and digits."""
    return _WORD.findall(text.lower())


@dataclass
class Split:
    """Documents as a flat token-id tensor plus per-document offsets (for `nn.EmbeddingBag`) and labels."""

    ids: Tensor
    offsets: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids and offsets of the documents ``index``, in that order."""
        ends = torch.cat([self.offsets[1:], self.offsets.new_tensor([self.ids.numel()])])
        starts, lengths = self.offsets[index], ends[index] - self.offsets[index]
        offsets = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(int(lengths.sum())) - torch.repeat_interleave(offsets - starts, lengths)
        return self.ids[pos], offsets


@dataclass
class TextDataset:
    """A tokenised text classification dataset with train / validation / test splits."""

    name: str
    vocab: list[str]
    classes: list[str]
    train: Split
    val: Split
    test: Split


def paths(root: Path, name: str) -> tuple[Path, Path]:
    """The metadata and corpus files of dataset ``name`` under data root ``root``."""
    base = Path(root) / "text_gcn" / "data"
    return base / f"{name}.txt", base / "corpus" / f"{name}.txt"


def _split(docs: list[list[str]], labels: list[int], index: list[int], stoi: dict[str, int]) -> Split:
    ids, offsets = [], []
    for i in index:
        offsets.append(len(ids))
        ids.extend(stoi[w] for w in docs[i] if w in stoi)
    return Split(torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long),
                 torch.tensor([labels[i] for i in index], dtype=torch.long))


def load_text_gcn(name: str, root: str | Path | None = None, min_count: int = 1, val_fraction: float = 0.1,
                  split_seed: int = 0) -> TextDataset:
    """Load dataset ``name`` (e.g. "R8", "R52", "20ng", "ohsumed", "mr") from the data root.

    ``val_fraction`` of the training documents (a random subset drawn with ``split_seed``) form the
    validation split. Words occurring fewer than ``min_count`` times in the remaining training documents
    are dropped. Raises `DataNotFoundError` naming the expected files when they are missing.
    """
    return _load(name, str(data_root(root)), min_count, val_fraction, split_seed)


@lru_cache(maxsize=4)
def _load(name: str, root: str, min_count: int, val_fraction: float, split_seed: int) -> TextDataset:
    meta, corpus = paths(Path(root), name)
    missing = [str(p) for p in (meta, corpus) if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"text classification dataset {name!r} not found: missing {', '.join(missing)}. "
            f"Put the text_gcn files there (published at {SOURCE}) or pass --data-dir / set TRITIUM_DATA."
        )
    rows = [line.split("\t") for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = corpus.read_text(encoding="utf-8", errors="replace").splitlines()
    if len(rows) != len(texts):
        raise ValueError(f"{meta} has {len(rows)} documents but {corpus} has {len(texts)} lines")
    if any(len(r) < 3 for r in rows):
        raise ValueError(f"{meta}: every line must be 'id<TAB>split<TAB>label'")
    classes = sorted({r[2].strip() for r in rows})
    cix = {c: i for i, c in enumerate(classes)}
    labels = [cix[r[2].strip()] for r in rows]
    train = [i for i, r in enumerate(rows) if "train" in r[1]]
    test = [i for i, r in enumerate(rows) if "test" in r[1]]
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed)).tolist()
    n_val = int(round(val_fraction * len(train)))
    val = sorted(train[j] for j in perm[:n_val])
    train = sorted(train[j] for j in perm[n_val:])
    docs = [tokenize(t) for t in texts]
    counts = Counter(w for i in train for w in docs[i])
    vocab = sorted(w for w, c in counts.items() if c >= min_count)
    stoi = {w: i for i, w in enumerate(vocab)}
    return TextDataset(name, vocab, classes, _split(docs, labels, train, stoi),
                       _split(docs, labels, val, stoi), _split(docs, labels, test, stoi))
