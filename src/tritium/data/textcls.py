"""Text classification data in the text_gcn layout, tokenised once into index tensors.

Layout under the data root: ``text_gcn/data/<name>.txt`` (one line per document, ``id<TAB>split<TAB>label``;
a split containing "train" or "test") and ``text_gcn/data/corpus/<name>.txt`` (one document per line,
same order). Documents become bags of token ids in one of two ways (``features``):

* ``words``: lowercased runs of letters and digits; the vocabulary is the words of the training documents
  (validation documents excluded) seen at least ``min_count`` times there.
* ``wordpiece``: a WordPiece tokenizer set up like bert-base-uncased's (BERT normalizer with lowercasing and
  accent stripping, BERT pre-tokenizer, ``##`` continuation pieces, the special tokens [PAD] [UNK] [CLS]
  [SEP] [MASK], at most 30,522 pieces) but trained with Hugging Face ``tokenizers`` on the training
  documents only; every document is the bag of its piece ids with [CLS] and [SEP] added, as
  ``tokenizer.encode`` gives them. Trained tokenizers are cached as tokenizer JSON under
  ``$TRITIUM_CACHE/wordpiece`` (`tritium.data.cache_dir`), keyed by the dataset files and the settings.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .. import atomic
from . import DataNotFoundError, cache_dir, data_root

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SOURCE = "https://github.com/yao8839836/text_gcn (data/<name>.txt and data/corpus/<name>.txt)"
FEATURES = ("words", "wordpiece")
#: Pieces of bert-base-uncased's WordPiece vocabulary: the default size of a trained one.
WORDPIECE_VOCAB = 30522
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
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
    features: str = "words"
    #: SHA-256 (first 16 hex digits) of the WordPiece tokenizer's JSON; "" for words.
    tokenizer: str = ""


def paths(root: Path, name: str) -> tuple[Path, Path]:
    """The metadata and corpus files of dataset ``name`` under data root ``root``."""
    base = Path(root) / "text_gcn" / "data"
    return base / f"{name}.txt", base / "corpus" / f"{name}.txt"


def _split(doc_ids: Sequence[Sequence[int]], labels: list[int], index: list[int]) -> Split:
    lengths = [len(doc_ids[i]) for i in index]
    ids = np.fromiter(itertools.chain.from_iterable(doc_ids[i] for i in index), dtype=np.int64, count=sum(lengths))
    offsets = np.cumsum([0, *lengths[:-1]], dtype=np.int64) if lengths else np.zeros(0, dtype=np.int64)
    return Split(torch.from_numpy(ids), torch.from_numpy(offsets),
                 torch.tensor([labels[i] for i in index], dtype=torch.long))


def train_wordpiece(texts: Sequence[str], vocab_size: int = WORDPIECE_VOCAB, min_frequency: int = 1) -> Tokenizer:
    """A bert-base-uncased-style WordPiece tokenizer trained on ``texts``: at most ``vocab_size`` pieces, pairs
    merged only when seen at least ``min_frequency`` times; its post-processor adds [CLS] and [SEP]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, limit_alphabet=1000,
                                        special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##",
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    return tok


def wordpiece_cache_path(name: str, files: Sequence[Path], settings: dict) -> Path:
    """The cache file of the WordPiece tokenizer of dataset ``name``: keyed by the bytes of ``files``, the
    ``settings`` (JSON-able) and the ``tokenizers`` version."""
    import tokenizers

    h = hashlib.sha256(json.dumps({"tokenizers": tokenizers.__version__, **settings}, sort_keys=True).encode())
    for f in files:
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return cache_dir("wordpiece") / f"{name}-{h.hexdigest()[:20]}.json"


def wordpiece_tokenizer(name: str, files: Sequence[Path], settings: dict, train_texts: Sequence[str],
                        vocab_size: int, min_frequency: int) -> Tokenizer:
    """The WordPiece tokenizer trained on ``train_texts`` (`train_wordpiece`), read from its cache file
    (`wordpiece_cache_path`) when present, else trained and written there atomically as tokenizer JSON.

    Training breaks ties between equally frequent pairs arbitrarily, so two trainings on the same texts may
    differ in a few pieces: the cache file fixes one tokenizer for every run that uses it, and processes
    sharing the cache folder take turns (a lock file next to it), so the first one trains and the others read.
    """
    from tokenizers import Tokenizer

    settings = {**settings, "vocab_size": vocab_size, "min_frequency": min_frequency}
    path = wordpiece_cache_path(name, files, settings)
    with open(path.with_name(f".{path.name}.lock"), "ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if path.is_file():
            try:
                return Tokenizer.from_file(str(path))
            except Exception:  # an unreadable cache file (tokenizers raises plain Exception) is rebuilt
                pass
        tok = train_wordpiece(train_texts, vocab_size, min_frequency)
        atomic.write_text(path, tok.to_str())
        return tok


def load_text_gcn(name: str, root: str | Path | None = None, min_count: int = 1, val_fraction: float = 0.1,
                  split_seed: int = 0, features: str = "words", vocab_size: int = WORDPIECE_VOCAB) -> TextDataset:
    """Load dataset ``name`` (e.g. "R8", "R52", "20ng", "ohsumed", "mr") from the data root.

    ``val_fraction`` of the training documents (a random subset drawn with ``split_seed``) form the
    validation split; the remaining ones are the training split. ``features`` "words": words occurring fewer
    than ``min_count`` times in the training split are dropped. ``features`` "wordpiece": a WordPiece
    tokenizer of at most ``vocab_size`` pieces is trained on the training split (`wordpiece_tokenizer`,
    ``min_count`` as its minimum pair frequency) and ``vocab`` lists its pieces by id. Raises
    `DataNotFoundError` naming the expected files when they are missing, ValueError for an unknown
    ``features``.
    """
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; choose from {', '.join(FEATURES)}")
    return _load(name, str(data_root(root)), min_count, val_fraction, split_seed, features, vocab_size)


@lru_cache(maxsize=4)
def _load(name: str, root: str, min_count: int, val_fraction: float, split_seed: int, features: str,
          vocab_size: int) -> TextDataset:
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
    doc_ids: Sequence[Sequence[int]]
    if features == "wordpiece":
        settings = {"val_fraction": val_fraction, "split_seed": split_seed}
        tok = wordpiece_tokenizer(name, (meta, corpus), settings, [texts[i] for i in train], vocab_size, min_count)
        pieces = tok.get_vocab()
        vocab = sorted(pieces, key=pieces.__getitem__)
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: without character offsets
        doc_ids = [e.ids for e in encode(texts)]
        digest = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    else:
        docs = [tokenize(t) for t in texts]
        counts = Counter(w for i in train for w in docs[i])
        vocab = sorted(w for w, c in counts.items() if c >= min_count)
        stoi = {w: i for i, w in enumerate(vocab)}
        doc_ids = [[stoi[w] for w in doc if w in stoi] for doc in docs]
        digest = ""
    return TextDataset(name, vocab, classes, _split(doc_ids, labels, train), _split(doc_ids, labels, val),
                       _split(doc_ids, labels, test), features, digest)
