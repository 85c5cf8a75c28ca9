"""Plain-text corpora for language-model pre-training: split, tokenizer, token windows, collators.

* Corpus: one text file, or a directory holding its own splits as ``train.txt`` and ``valid.txt``
  (`SPLIT_FILES`), e.g. the English novels set ``lm/novels`` of the data root.
* Split of a single file: the first ``1 - val_fraction`` of the characters (default 90%) are the training
  split, the rest the validation split (contiguous, cut at a line start), so validation text is never seen
  in training. A directory's files are used as they are.
* Tokenizer: byte-level BPE (default, no unknown tokens on any text) or WordPiece, trained with Hugging
  Face ``tokenizers`` on the training split only: on all of it up to `TOKENIZER_CHARS` characters, on a
  deterministic sample of that size (evenly spaced blocks of whole lines, `tokenizer_sample`) beyond. Ids
  0.. are the special tokens (`SPECIALS`, then the span-corruption sentinels), so ordinary tokens are
  ``n_special..vocab_size-1``. Both splits are encoded in batches of whole lines; the tokenizer and the
  encoded splits are cached in ``cache_dir/<key>/``, keyed by the corpus hash and the settings.
* Batches: random windows of ``seq_len`` tokens, drawn from a generator seeded by (seed, step).
* Collators: BERT masking (`mask_tokens`) and T5 span corruption (`span_corrupt`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from .. import atomic

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]")
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
#: The files of a corpus directory: its training and its validation split.
SPLIT_FILES = ("train.txt", "valid.txt")
#: Where the English novels set (``<data root>/lm/novels``) comes from.
NOVELS_SOURCE = ("GitHub computationalstylistics/100_english_novels (corpus/*.txt) and COST-ELTeC/ELTeC-eng "
                 "(level1/*.xml as plain text), split by book; see the data README, section 'English novels'")
#: The most characters of a training split the tokenizer is trained on (beyond: `tokenizer_sample`).
TOKENIZER_CHARS = 32_000_000


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
    """The corpus ``path``, a text file or a directory with `SPLIT_FILES`: as given, else relative to the
    data root, else to ``<data root>/lm``. Missing, or a directory without both split files:
    FileNotFoundError naming what was looked for and where the data is published."""
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
        if cand.is_dir():
            missing = [f for f in SPLIT_FILES if not (cand / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"corpus directory {cand} lacks {' and '.join(missing)}: a corpus directory holds its "
                    f"training split as {SPLIT_FILES[0]} and its validation split as {SPLIT_FILES[1]} (plain "
                    f"UTF-8 text). The English novels set lm/novels is published as {NOVELS_SOURCE}"
                )
            return cand
    raise FileNotFoundError(
        f"corpus not found; tried {', '.join(str(c) for c in tried)}. Pass --corpus PATH to a plain-text file "
        f"or to a directory with {' and '.join(SPLIT_FILES)} (tiny-shakespeare is published as karpathy/char-rnn "
        f"data/tinyshakespeare/input.txt, {TINY_SHAKESPEARE_URL}; the default location is "
        f"<data root>/lm/tinyshakespeare.txt; the English novels set lm/novels is published as {NOVELS_SOURCE})"
    )


def has_splits(path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether the corpus ``path`` is a directory with its own splits (False also when it is not found)."""
    try:
        return resolve_corpus(path, data_dir).is_dir()
    except FileNotFoundError:
        return False


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Contiguous (train, val) split: the last ``val_fraction`` of the text, starting at a line start."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
    cut = int(len(text) * (1.0 - val_fraction))
    line_start = text.rfind("\n", 0, cut) + 1
    if line_start > 0.5 * cut:
        cut = line_start
    return text[:cut], text[cut:]


def _lines(text: str, chunk: int = 1 << 14) -> Iterator[str]:
    """The text in pieces of whole lines (about ``chunk`` characters; a longer line is one piece), for
    batched tokenizer calls."""
    pos, n = 0, len(text)
    while pos < n:
        end = text.find("\n", min(pos + chunk, n) - 1)
        end = n if end < 0 else end + 1
        yield text[pos:end]
        pos = end


def tokenizer_sample(text: str, max_chars: int = TOKENIZER_CHARS, chunk: int | None = None) -> str:
    """``text`` itself if it has at most ``max_chars`` characters, else a deterministic sample of about
    ``max_chars``: evenly spaced pieces of whole lines (`_lines` of ``chunk`` characters, default
    ``max_chars / 256``), in order."""
    if len(text) <= max_chars:
        return text
    pieces = list(_lines(text, chunk or max(1, max_chars // 256)))
    take = max(1, round(len(pieces) * max_chars / len(text)))
    return "".join(pieces[i * len(pieces) // take] for i in range(take))


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


def encode(tokenizer, text: str, batch_chars: int = 1 << 22) -> np.ndarray:
    """Token ids of ``text`` as one int32 array (no special tokens added).

    The text is encoded in batches of about ``batch_chars`` characters of whole-line pieces, so memory
    stays bounded by the batch (the tokenizer's per-token objects) plus the ids.
    """
    fast = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets (tokenizers >= 0.21)
    out: list[np.ndarray] = []
    batch: list[str] = []
    size = 0

    def flush() -> None:
        out.extend(np.asarray(e.ids, dtype=np.int32) for e in fast(batch, add_special_tokens=False))
        batch.clear()

    for piece in _lines(text):
        batch.append(piece)
        size += len(piece)
        if size >= batch_chars:
            flush()
            size = 0
    if batch:
        flush()
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


def _save_atomic(path: Path, write) -> None:
    atomic.write_with(path, write)


def _read_splits(src: Path, val_fraction: float) -> tuple[str, str]:
    """The (train, val) texts of a corpus file (split by `split_text`) or directory (`SPLIT_FILES`)."""
    if src.is_dir():
        train, val = ((src / f).read_bytes().decode("utf-8", errors="replace") for f in SPLIT_FILES)
        for name, text in zip(SPLIT_FILES, (train, val), strict=True):
            if not text.strip():
                raise ValueError(f"corpus {src}: {name} is empty")
        return train, val
    train, val = split_text(src.read_bytes().decode("utf-8", errors="replace"), val_fraction)
    if not train.strip() or not val.strip():
        raise ValueError(f"corpus {src} is too small to split")
    return train, val


def _digest(src: Path) -> str:
    """sha256 of a corpus file, or of a directory's split files (each one's name and length, then its bytes)."""
    h = hashlib.sha256()
    for f in [src] if src.is_file() else [src / name for name in SPLIT_FILES]:
        if f is not src:
            h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with open(f, "rb") as stream:
            while block := stream.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def load_corpus(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    vocab_size: int = 2048,
    kind: str = "bpe",
    val_fraction: float | None = 0.1,
    n_sentinels: int = 32,
    data_dir: str | os.PathLike | None = None,
    tokenizer_chars: int = TOKENIZER_CHARS,
) -> Corpus:
    """Split (a file) or read the splits (a directory), tokenize (training the tokenizer on at most
    ``tokenizer_chars`` characters of the training split, see `tokenizer_sample`) and cache a corpus.

    ``val_fraction`` (None: 0.1) splits a single file and is ignored for a directory.
    """
    from tokenizers import Tokenizer

    src = resolve_corpus(path, data_dir)
    split_dir = src.is_dir()
    val_fraction = 0.1 if val_fraction is None else val_fraction
    settings: dict = {"vocab_size": vocab_size, "kind": kind, "val_fraction": None if split_dir else val_fraction,
                      "n_sentinels": n_sentinels}
    if split_dir:
        settings["splits"] = list(SPLIT_FILES)
    train_bytes = (src / SPLIT_FILES[0] if split_dir else src).stat().st_size
    if train_bytes > tokenizer_chars:  # a text of at most that many bytes is never sampled
        settings["tokenizer_chars"] = tokenizer_chars
    blob = _digest(src) + json.dumps(settings, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{src.stem}-{kind}{vocab_size}-{key}"
    files = {name: folder / name for name in ("tokenizer.json", "train.npy", "val.npy", "meta.json")}
    if all(f.is_file() for f in files.values()):
        tok = Tokenizer.from_file(str(files["tokenizer.json"]))
        train, val = np.load(files["train.npy"]), np.load(files["val.npy"])
    else:
        train_text, val_text = _read_splits(src, val_fraction)
        t0 = time.perf_counter()
        sample = tokenizer_sample(train_text, tokenizer_chars)
        tok = train_tokenizer(sample, vocab_size, kind, n_sentinels)
        t1 = time.perf_counter()
        train, val = encode(tok, train_text), encode(tok, val_text)
        t2 = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(files["train.npy"], lambda p: np.save(open(p, "wb"), train))
        _save_atomic(files["val.npy"], lambda p: np.save(open(p, "wb"), val))
        _save_atomic(files["tokenizer.json"], lambda p: tok.save(str(p)))
        meta = {"corpus": str(src), **settings, "train_chars": len(train_text), "val_chars": len(val_text),
                "tokenizer_trained_on_chars": len(sample), "train_tokens": len(train), "val_tokens": len(val),
                "tokenizer_s": round(t1 - t0, 2), "encode_s": round(t2 - t1, 2)}
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
