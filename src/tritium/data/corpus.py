"""Plain-text corpora for language-model pre-training: split, tokenizer, token windows, collators.

* Split: the first ``1 - val_fraction`` of the characters (default 90%) are the training split, the rest
  the validation split (contiguous, cut at a line start), so validation text is never seen in training.
* Tokenizer: byte-level BPE (default, no unknown tokens on any text) or WordPiece, trained with Hugging
  Face ``tokenizers`` on the training split only. Ids 0.. are the special tokens (`SPECIALS`, then the
  span-corruption sentinels), so ordinary tokens are ``n_special..vocab_size-1``. The tokenizer and the
  encoded splits are cached in ``cache_dir/<key>/``, keyed by the corpus hash and the settings.
* Batches: random windows of ``seq_len`` tokens, drawn from a generator seeded by (seed, step).
* Collators: BERT masking (`mask_tokens`) and T5 span corruption (`span_corrupt`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from .. import atomic

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]")
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


@dataclass
class Corpus:
    """Token ids of the two splits plus the tokenizer and its special ids."""

    train: torch.Tensor  # int64, 1-D
    val: torch.Tensor
    tokenizer: object  # tokenizers.Tokenizer
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int
    sentinels: list[int]  # span-corruption sentinels <extra_id_0>, <extra_id_1>, ...
    n_special: int  # ids below this are special tokens
    path: str
    key: str


def resolve_corpus(path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """The corpus file ``path``: as given, else relative to the data root. Missing: FileNotFoundError."""
    p = Path(path).expanduser()
    tried = [p]
    if not p.is_absolute():
        try:
            from tritium.data import data_root

            root = Path(data_root(data_dir))
        except ImportError:
            root = Path(data_dir or os.environ.get("TRITIUM_DATA") or "../shared/data")
        tried += [root / p, root / "lm" / p]
    for cand in tried:
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"corpus not found; tried {', '.join(str(c) for c in tried)}. Pass --corpus PATH to a plain-text file "
        f"(tiny-shakespeare is published as karpathy/char-rnn data/tinyshakespeare/input.txt, "
        f"{TINY_SHAKESPEARE_URL}; the default location is <data root>/lm/tinyshakespeare.txt)"
    )


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Contiguous (train, val) split: the last ``val_fraction`` of the text, starting at a line start."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
    cut = int(len(text) * (1.0 - val_fraction))
    line_start = text.rfind("\n", 0, cut) + 1
    if line_start > 0.5 * cut:
        cut = line_start
    return text[:cut], text[cut:]


def _lines(text: str, chunk: int = 1 << 14) -> list[str]:
    """The text in pieces of whole lines (about ``chunk`` characters), for batched tokenizer calls."""
    out, buf, size = [], [], 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        size += len(line)
        if size >= chunk:
            out.append("".join(buf))
            buf, size = [], 0
    if buf:
        out.append("".join(buf))
    return out


def train_tokenizer(text: str, vocab_size: int = 2048, kind: str = "bpe", n_sentinels: int = 32):
    """A ``tokenizers.Tokenizer`` trained on ``text``; special ids first (`SPECIALS`, then sentinels)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = list(SPECIALS) + [f"<extra_id_{i}>" for i in range(n_sentinels)]
    if vocab_size <= len(specials) + 256 and kind == "bpe":
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE (need > {len(specials) + 256})")
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"tokenizer kind {kind!r} is not supported; choose 'bpe' or 'wordpiece'")
    tok.train_from_iterator(_lines(text), trainer=trainer)
    return tok


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` as one int32 array (no special tokens added)."""
    ids = [e.ids for e in tokenizer.encode_batch(_lines(text), add_special_tokens=False)]
    return np.fromiter((i for seq in ids for i in seq), dtype=np.int32)


def _save_atomic(path: Path, write) -> None:
    atomic.write_with(path, write)


def load_corpus(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    vocab_size: int = 2048,
    kind: str = "bpe",
    val_fraction: float = 0.1,
    n_sentinels: int = 32,
    data_dir: str | os.PathLike | None = None,
) -> Corpus:
    """Split, tokenize (training the tokenizer on the training split) and cache a plain-text corpus."""
    from tokenizers import Tokenizer

    src = resolve_corpus(path, data_dir)
    raw = src.read_bytes()
    settings = {"vocab_size": vocab_size, "kind": kind, "val_fraction": val_fraction, "n_sentinels": n_sentinels}
    blob = hashlib.sha256(raw).hexdigest() + json.dumps(settings, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{src.stem}-{kind}{vocab_size}-{key}"
    files = {name: folder / name for name in ("tokenizer.json", "train.npy", "val.npy", "meta.json")}
    if all(f.is_file() for f in files.values()):
        tok = Tokenizer.from_file(str(files["tokenizer.json"]))
        train, val = np.load(files["train.npy"]), np.load(files["val.npy"])
    else:
        train_text, val_text = split_text(raw.decode("utf-8", errors="replace"), val_fraction)
        if not train_text.strip() or not val_text.strip():
            raise ValueError(f"corpus {src} is too small to split")
        tok = train_tokenizer(train_text, vocab_size, kind, n_sentinels)
        train, val = encode(tok, train_text), encode(tok, val_text)
        folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(files["train.npy"], lambda p: np.save(open(p, "wb"), train))
        _save_atomic(files["val.npy"], lambda p: np.save(open(p, "wb"), val))
        _save_atomic(files["tokenizer.json"], lambda p: tok.save(str(p)))
        meta = {"corpus": str(src), **settings, "train_tokens": len(train), "val_tokens": len(val)}
        _save_atomic(files["meta.json"], lambda p: p.write_text(json.dumps(meta, indent=1)))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    sentinels = [tok.token_to_id(f"<extra_id_{i}>") for i in range(n_sentinels)]
    return Corpus(
        train=torch.from_numpy(train.astype(np.int64)), val=torch.from_numpy(val.astype(np.int64)),
        tokenizer=tok, vocab_size=tok.get_vocab_size(), pad_id=ids["[PAD]"], bos_id=ids["[BOS]"],
        eos_id=ids["[EOS]"], mask_id=ids["[MASK]"], sentinels=sentinels,
        n_special=len(SPECIALS) + n_sentinels, path=str(src), key=key,
    )


def random_windows(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch_size, seq_len)`` windows of ``data`` at random offsets."""
    if len(data) <= seq_len:
        raise ValueError(f"split of {len(data)} tokens is too short for windows of {seq_len}")
    ix = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    return torch.stack([data[i: i + seq_len] for i in ix.tolist()])


def mask_tokens(
    ids: torch.Tensor, mask_id: int, vocab_size: int, n_special: int, generator: torch.Generator,
    prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select ``prob`` of the tokens; of those 80% -> [MASK], 10% -> random, 10% kept.

    Returns ``(input_ids, labels)``; labels are the original ids at selected positions, -100 elsewhere.
    Random replacements are ordinary tokens (ids ``n_special..vocab_size-1``).
    """
    selected = torch.rand(ids.shape, generator=generator) < prob
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(selected & (r < 0.8), torch.full_like(ids, mask_id), ids)
    random_ids = torch.randint(n_special, vocab_size, ids.shape, generator=generator)
    inputs = torch.where(selected & (r >= 0.8) & (r < 0.9), random_ids, inputs)
    return inputs, labels


def _segments(n_items: int, n_segments: int, generator: torch.Generator) -> list[int]:
    """A uniformly random split of ``n_items`` into ``n_segments`` positive lengths."""
    cuts = (torch.randperm(n_items - 1, generator=generator)[: n_segments - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, n_items]
    return [b - a for a, b in pairwise(bounds)]


def noise_mask(length: int, generator: torch.Generator, density: float = 0.15, mean_span: float = 3.0) -> torch.Tensor:
    """T5's random span noise mask: about ``density * length`` noise tokens in spans of mean ``mean_span``.

    Spans alternate with kept segments, starting with a kept one; every sequence of the same length gets
    the same number of noise tokens and spans.
    """
    n_noise = min(max(round(length * density), 1), length - 1)
    n_spans = max(min(round(n_noise / mean_span), n_noise, length - n_noise), 1)
    noise = _segments(n_noise, n_spans, generator)
    keep = _segments(length - n_noise, n_spans, generator)
    mask = torch.zeros(length, dtype=torch.bool)
    pos = 0
    for k, n in zip(keep, noise, strict=True):
        mask[pos + k: pos + k + n] = True
        pos += k + n
    return mask


def span_corrupt(
    ids: torch.Tensor, sentinels: list[int], eos_id: int, generator: torch.Generator,
    density: float = 0.15, mean_span: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 span corruption of a ``(batch, length)`` tensor: returns ``(input_ids, labels)``.

    Each noise span is replaced by the next sentinel in the input; the labels list, per span, its
    sentinel then the span's tokens, and end with EOS (the input ends with EOS too).
    """
    inputs, labels = [], []
    for row in ids:
        mask = noise_mask(len(row), generator, density, mean_span).tolist()
        x, y, k, prev = [], [], 0, False
        for tok, noisy in zip(row.tolist(), mask, strict=True):
            if noisy and not prev:
                if k == len(sentinels):
                    raise ValueError(f"more noise spans than the {len(sentinels)} sentinel tokens")
                x.append(sentinels[k])
                y.append(sentinels[k])
                k += 1
            (y if noisy else x).append(tok)
            prev = noisy
        inputs.append(x + [eos_id])
        labels.append(y + [eos_id])
    return torch.tensor(inputs), torch.tensor(labels)
