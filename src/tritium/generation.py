"""Text generation with a saved model: `load_pretrained`, `generate` and ``tritium generate FILE``.

`load_pretrained` rebuilds the transformers model a file was saved from out of its stored ``model_class``
and ``model_config`` (only the classes of `tritium.models.transformers.MODEL_CLASSES`, looked up by name in
``transformers``), on the meta device, fills it with `tritium.load` and reads the stored tokenizer, if any.
`generate` runs transformers' own ``generate`` (greedy by default, or sampling with a temperature and
top-p) and hands each new token to a callback as it is produced. The command streams the text (or, for a
prompt given as token ids, the ids) to stdout and reports prefill and decode tokens/s on stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .args import UsageError, _ranged, comma_list, existing_file, nonnegative_float, nonnegative_int
from .args import positive_int as _positive_int
from .formats.native import PathLike, TritiumFormatError, _printable, load, load_tokenizer, read_header

top_p_value = _ranged(float, lambda x: 0 < x <= 1, "a number > 0 and <= 1", "A number in (0, 1].")


class TooLong(ValueError):
    """The prompt plus the tokens to generate exceed the positions the model handles."""


def token_ids(value: object) -> list[int]:
    """A non-empty comma list of token ids (integers >= 0)."""
    try:
        return [nonnegative_int(x) for x in comma_list(value).split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a comma list of token ids (integers >= 0), got {value!r}") \
            from None


@dataclass
class Generation:
    """What `generate` produced.

    Attributes:
        ids: the generated token ids (the prompt excluded; an end-of-sequence token included).
        text: their decoded text (special tokens skipped), or None without a tokenizer.
        prompt_tokens: the prompt's length in tokens.
        prefill_s: seconds from the start of generation to the first new token (the prompt's forward pass).
        decode_s: seconds for the remaining ``len(ids) - 1`` tokens.
    """

    ids: list[int]
    text: str | None
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of the prefill."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else math.nan

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second after the first one (nan with fewer than two tokens)."""
        return (len(self.ids) - 1) / self.decode_s if len(self.ids) > 1 and self.decode_s > 0 else math.nan


def load_pretrained(path: PathLike, model: nn.Module | None = None) -> tuple[nn.Module, object | None]:
    """(model in eval mode, ``tokenizers.Tokenizer`` or None) from a file written by `tritium.save`, or from a
    llama.cpp GGUF file with TQ2_0/TQ1_0 linear layers (`tritium.formats.gguf.import_gguf`).

    Without ``model`` the architecture is rebuilt from the transformers class and config the file stores;
    a file without them (saved from a model that has no transformers config) raises `TritiumFormatError`
    asking for ``model``, a skeleton of the saved architecture (see `tritium.load`). A malformed file,
    config or tokenizer raises `TritiumFormatError`.
    """
    from .formats.gguf import import_gguf, is_gguf
    from .models.transformers import from_config

    if model is None and is_gguf(path):  # a llama.cpp file: see tritium.formats.gguf.import_gguf
        return import_gguf(path)
    header = read_header(path)
    if model is None:
        model_class, config = header.metadata.get("model_class"), header.model_config
        if model_class is None or config is None:
            raise TritiumFormatError(
                f"{os.fspath(path)}: the file stores no transformers model class and config, so its architecture "
                "cannot be rebuilt; pass a skeleton of the saved model: load_pretrained(path, model=skeleton) "
                "or tritium.load(path, model=skeleton)")
        try:
            model = from_config(model_class, config, max_blocks=len(header.tensors))
        except ValueError as e:
            raise TritiumFormatError(f"{os.fspath(path)}: {e}") from None
    tokenizer = load_tokenizer(path, header)
    return load(path, model=model), tokenizer


class _Streamer:
    """The transformers streamer protocol (``put(ids)``, ``end()``): records the time of each new token and
    hands it, with the text it completes, to ``on_token``."""

    def __init__(self, tokenizer: object | None, on_token: Callable[[int, str], None] | None):
        self.tokenizer, self.on_token = tokenizer, on_token
        self.ids: list[int] = []
        self.start: float | None = None
        self.first: float | None = None
        self.shown = 0  # characters of the decoded text handed out so far

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.start is None:  # the prompt
            self.start = now
            return
        if self.first is None:
            self.first = now
        for tok in value.reshape(-1).tolist():
            self.ids.append(int(tok))
            piece = ""
            if self.tokenizer is not None:
                text = self._text()
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    piece, self.shown = text[self.shown:], len(text)
            if self.on_token is not None:
                self.on_token(int(tok), piece)

    def end(self) -> None:
        if self.tokenizer is not None and self.on_token is not None and self.ids:
            text = self._text()
            if len(text) > self.shown:
                self.on_token(-1, text[self.shown:])
                self.shown = len(text)


def max_positions(model: nn.Module) -> int | None:
    """The number of positions the model's config allows (prompt plus generated tokens), if it says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        n = getattr(config, key, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def encode(tokenizer: object, prompt: str, model: nn.Module | None = None) -> list[int]:
    """The token ids of ``prompt`` (with the tokenizer's special tokens); an empty prompt becomes the
    model's beginning-of-sequence token when it has one. ValueError if the tokenizer fails."""
    try:
        ids = list(tokenizer.encode(prompt).ids)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a Rust panic in tokenizers derives from BaseException
        raise ValueError(f"the tokenizer cannot encode the prompt ({' '.join(str(e).split())[:200]})") from None
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if not ids and isinstance(bos, int):
        ids = [bos]
    return ids


def prompt_ids(model: nn.Module, prompt: str | Sequence[int], tokenizer: object | None = None, *,
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0) -> list[int]:
    """The token ids `generate` would start from; ValueError for any argument it would refuse."""
    if not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()):
        raise ValueError(f"{type(model).__name__} does not generate text")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; give token ids instead")
        ids = encode(tokenizer, prompt, model)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt is empty (no tokens)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    vocab = model.get_input_embeddings().num_embeddings
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
    limit = max_positions(model)
    if limit is not None and not getattr(model.config, "is_encoder_decoder", False) \
            and len(ids) + max_new_tokens > limit:
        raise TooLong(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                      f"{limit} positions")
    return ids


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt: str | Sequence[int],
    tokenizer: object | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_token: Callable[[int, str], None] | None = None,
) -> Generation:
    """Continue ``prompt`` (text, which needs ``tokenizer``, or token ids) with transformers' ``generate``.

    ``temperature=0`` (the default) decodes greedily, exactly as ``model.generate(..., do_sample=False)``;
    ``temperature > 0`` samples from the softmax at that temperature, restricted to the smallest set of
    tokens whose probability reaches ``top_p``. ``seed`` makes sampling reproducible (the global torch
    random state is left as it was). Generation stops after ``max_new_tokens`` tokens or at the model's
    end-of-sequence token. ``on_token(id, text)`` is called for every new token as soon as it exists, with
    the text it completes (``""`` while a character is incomplete, or without a tokenizer), and once more
    with id -1 for text still held back at the end. Raises ValueError for bad arguments.
    """
    ids = prompt_ids(model, prompt, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p)
    config = model.generation_config
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    kwargs: dict = {"max_new_tokens": max_new_tokens, "min_new_tokens": 0, "num_beams": 1, "pad_token_id": pad}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kwargs.update(do_sample=False)
    input_ids = torch.tensor([ids], dtype=torch.long)
    streamer = _Streamer(tokenizer, on_token)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs)
    done = time.perf_counter()
    first = streamer.first if streamer.first is not None else done
    start = streamer.start if streamer.start is not None else first
    text = streamer._text() if tokenizer is not None else None
    return Generation(streamer.ids, text, len(ids), first - start, done - first)


# -------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=existing_file, help="a file written by tritium.save from a transformers model")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt (needs a tokenizer stored in FILE)")
    prompt.add_argument("--ids", metavar="ID,ID,...", type=token_ids,
                        help="the prompt as token ids; the generated ids are printed")
    parser.add_argument("--max-new-tokens", metavar="N", type=_positive_int, default=64,
                        help="tokens to generate at most (default 64; fewer at an end-of-sequence token)")
    parser.add_argument("--temperature", metavar="T", type=nonnegative_float, default=0.0,
                        help="0 (default): greedy; > 0: sample at this temperature")
    parser.add_argument("--top-p", metavar="P", type=top_p_value, default=None,
                        help="sample from the smallest set of tokens with this total probability (needs "
                             "--temperature > 0; default 1)")
    parser.add_argument("--seed", type=nonnegative_int, default=None, help="seed for sampling")


def _writer(stream, escape: bool) -> Callable[[str], None]:
    def write(text: str) -> None:
        if escape:  # a terminal: show control characters instead of executing them
            text = "".join(c if c in "\n\t" or c.isprintable() else _printable(c) for c in text)
        stream.write(text)
        stream.flush()

    return write


def run(args: argparse.Namespace) -> int:
    """``tritium generate``: a bad file or argument is a usage error (one line, exit 2)."""
    if args.top_p is not None and args.temperature == 0:
        raise UsageError("--top-p: needs sampling (--temperature > 0)")
    try:
        model, tokenizer = load_pretrained(args.file)
    except TritiumFormatError as e:
        raise UsageError(_printable(e)) from None
    if not model.can_generate():
        raise UsageError(f"{_printable(args.file)}: a {type(model).__name__} does not generate text")
    if args.prompt is not None and tokenizer is None:
        raise UsageError(f"{_printable(args.file)} stores no tokenizer: give the prompt as token ids "
                         "(--ids 1,2,3), or save the model with tritium.save(model, path, tokenizer=...)")
    write = _writer(sys.stdout, sys.stdout.isatty())
    as_ids = args.prompt is None
    count = 0

    def on_token(tok: int, piece: str) -> None:
        nonlocal count
        if as_ids:
            if tok >= 0:
                write(("," if count else "") + str(tok))
                count += 1
        elif piece:
            write(piece)

    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "top_p": 1.0 if args.top_p is None else args.top_p}
    try:
        ids = prompt_ids(model, args.ids if as_ids else args.prompt, tokenizer, **options)
    except TooLong as e:
        raise UsageError(f"--max-new-tokens: {_printable(e)}") from None
    except ValueError as e:
        raise UsageError(f"{'--ids' if as_ids else '--prompt'}: {_printable(e)}") from None
    try:
        g = generate(model, ids, tokenizer, seed=args.seed, on_token=on_token, **options)
        write("\n")
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    print(f"prefill: {g.prompt_tokens} tokens in {1e3 * g.prefill_s:.1f} ms ({g.prefill_tokens_per_s:.1f} tokens/s); "
          f"decode: {max(len(g.ids) - 1, 0)} tokens in {g.decode_s:.3f} s ({g.decode_tokens_per_s:.1f} tokens/s)",
          file=sys.stderr)
    return 0
