"""Transformer pre-training from scratch at full precision and 1.58 bits (Nielsen et al., 2024, sec. 5).

Tasks ``encoder`` (BertForMaskedLM, masked LM), ``seq2seq`` (T5ForConditionalGeneration, span corruption)
and ``decoder`` (LlamaForCausalLM, causal LM) on a plain-text corpus (`tritium.data.corpus`: one file split
90/10, or a directory with its own ``train.txt`` and ``valid.txt`` such as ``lm/novels``).

Every precision of a grid sees the same batches (batch size, sequence length, steps and data order), so
the token budget is the same. Precisions (`tritium.Precision`): ``fp32``; ``bf16`` = fp32 master weights
with the forward and backward in bf16 autocast; any quantized spec (``1.58-absmedian``, ...) converts the
model with `tritium.quantize` before training; ``ptq-<spec>`` trains fp32, then applies `tritium.ptq`;
``cqat<F>-<spec>`` (continual QAT, arXiv 2502.11895) trains in float for the first ``round(F * steps)``
steps, then converts the model with `tritium.quantize` in place and trains on quantization-aware with the
same AdamW state (the converted layers keep the very same parameters);
``+bf16`` after a spec trains (and evaluates) that precision under bf16 autocast. Embeddings and output
heads stay in full precision unless ``--quantize-heads``; ``--exclude REGEX`` keeps more modules in full
precision. Losses are measured on fixed training and validation batches at intervals; the summary
has the final validation loss, its perplexity and the gap (validation minus training loss).
``--compile [BACKEND]`` runs the model under ``torch.compile`` (inductor by default), on CPU and GPU alike.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tritium.args import (
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    positive_int_list,
    probability,
    regex,
    unit_interval,
)

if TYPE_CHECKING:
    from .checkpoint import Checkpointer

DISTRIBUTED = True  # DDP/FSDP under torchrun, checkpoints and exact resume
CONTINUAL_QAT = True  # runs cqat<F>- precisions (a float phase, then quantization-aware training)
METRIC = "val_loss"
HIGHER_IS_BETTER = False
GROUP_BY = ("hidden",)
ARCHS = ("encoder", "seq2seq", "decoder")


def _ints(text: str | int | list) -> list[int]:
    if isinstance(text, int):
        return [text]
    items = text.split(",") if isinstance(text, str) else text
    return [int(x) for x in items]


def _vocab_size(value: object) -> int:
    from tritium.data.corpus import SPECIALS

    n, least = positive_int(value), 256 + len(SPECIALS) + 32 + 1  # bytes, special tokens, T5 sentinels
    if n < least:
        raise argparse.ArgumentTypeError(f"expected a vocabulary of at least {least} tokens, got {value!r}")
    return n


def _corpus_path(value: object) -> str:
    if not str(value).strip():
        raise argparse.ArgumentTypeError("expected a corpus file or directory, got ''")
    return str(value)


def _backend(value: object) -> str:
    """A torch.compile backend name (checked against torch's list by `grid`)."""
    text = str(value).strip()
    if not text or not all(c.isalnum() or c in "_-." for c in text):
        raise argparse.ArgumentTypeError(f"expected a torch.compile backend such as inductor, got {value!r}")
    return text


def _seq_len(value: object) -> int:
    n = positive_int(value)
    if n < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 tokens per sequence, got {value!r}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the language-model tasks (None: taken from the protocol)."""
    a = parser.add_argument
    a("--corpus", default=None, type=_corpus_path,
      help="plain-text corpus file, or a directory with train.txt and valid.txt such as lm/novels (relative "
           "paths also tried under the data root and <data root>/lm)")
    a("--val-fraction", type=fraction, default=None,
      help="last fraction of a corpus file used for validation (0.1; a directory has its own valid.txt)")
    a("--train-tokens", type=nonnegative_int, default=None,
      help="train on the first N tokens of the training split only (0: all), e.g. for several epochs")
    a("--tokenizer", default=None, choices=["bpe", "wordpiece"], help="tokenizer kind (byte-level bpe)")
    a("--vocab-size", type=_vocab_size, default=None, help="tokenizer vocabulary size")
    a("--hidden", default=None, type=positive_int_list, help="comma list of hidden sizes, e.g. 64,128,256,512")
    a("--layers", type=positive_int, default=None, help="transformer blocks (T5: per encoder and decoder)")
    a("--head-dim", type=positive_int, default=None, help="attention head size (heads = hidden / head_dim)")
    a("--dropout", type=probability, default=None, help="dropout probability")
    a("--steps", type=positive_int, default=None, help="optimizer steps")
    a("--batch-size", type=positive_int, default=None, help="sequences per step")
    a("--seq-len", type=_seq_len, default=None, help="tokens per sequence (T5: before span corruption)")
    a("--lr", type=positive_float, default=None, help="peak learning rate (AdamW)")
    a("--warmup", type=nonnegative_int, default=None, help="linear learning-rate warm-up steps, then cosine decay")
    a("--min-lr-ratio", type=unit_interval, default=None, help="final learning rate as a fraction of --lr")
    a("--weight-decay", type=nonnegative_float, default=None, help="AdamW weight decay of matrices")
    a("--eval-every", type=positive_int, default=None, help="steps between loss measurements")
    a("--eval-batches", type=positive_int, default=None, help="fixed batches per split per loss measurement")
    a("--exclude", action="append", default=None, metavar="REGEX", type=regex,
      help="keep modules whose name matches in full precision (repeatable; adds to the heads)")
    a("--quantize-heads", action="store_true", default=None, help="quantize the output head too")
    a("--warmup-lambda", type=nonnegative_int, default=None,
      help="steps of linear blend from full precision to quantized weights (tritium.LambdaWarmup); for a "
           "cqat precision, the steps after the switch")
    a("--compile", nargs="?", const="inductor", default=None, type=_backend, metavar="BACKEND",
      help="run the model under torch.compile (backend inductor unless given); CPU and GPU")
    a("--save-model", action="store_true", default=False,
      help="also save each trained model with its tokenizer as OUT/runs/<key>/model.safetensors (tritium.save; "
           "frozen for 1.58-bit precisions), ready for tritium generate")


def grid(args: argparse.Namespace, protocol: dict) -> list[dict]:
    """One config per hidden size, precision and seed."""
    from tritium.config import parse_precision
    from tritium.data.corpus import has_splits

    from .runner import precisions, seeds

    if args.task not in ARCHS:
        raise ValueError(f"task {args.task!r} is not a language-model task {ARCHS}")
    if not args.corpus:
        raise ValueError("no corpus: pass --corpus PATH")
    if getattr(args, "fsdp", False):
        cqat = [p for p in precisions(args) if parse_precision(p).switch_at is not None]
        if cqat:
            raise ValueError(f"--precision {cqat[0]}: continual QAT converts the model during training, which "
                             "FSDP's sharded modules do not allow; train it without --fsdp (DDP)")
    backend = getattr(args, "compile", None)
    if backend and backend != "inductor":
        from torch._dynamo import list_backends

        known = list_backends(exclude_tags=())
        if backend not in known:
            raise ValueError(f"--compile {backend}: not a torch.compile backend; choose one of {', '.join(known)}")
    # a corpus directory has its own validation split: no fraction enters the run config
    val_fraction = None if has_splits(args.corpus, getattr(args, "data_dir", None)) else args.val_fraction
    common = {
        "task": args.task, "corpus": Path(args.corpus).name, "layers": args.layers, "steps": args.steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "warmup": args.warmup,
        "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay, "eval_every": args.eval_every,
        "eval_batches": args.eval_batches, "vocab_size": args.vocab_size, "tokenizer": args.tokenizer,
        "val_fraction": val_fraction, "head_dim": args.head_dim, "dropout": args.dropout,
    }
    options = {"exclude": list(args.exclude or []), "quantize_heads": bool(args.quantize_heads),
               "warmup_lambda": int(args.warmup_lambda or 0), "train_tokens": int(args.train_tokens or 0)}
    # only non-default conversion and data options enter the config, so default runs keep their keys
    common.update({k: v for k, v in options.items() if v})
    return [
        {**common, "hidden": h, "precision": p, "seed": s}
        for h in _ints(args.hidden) for p in precisions(args) for s in seeds(args)
    ]


def make_batch_fn(arch: str, corpus, split: torch.Tensor, batch_size: int, seq_len: int) -> Callable:
    """``batch(generator) -> dict`` of model inputs with labels for ``arch``'s pre-training objective."""
    from tritium.data.corpus import mask_tokens, random_windows, span_corrupt

    def batch(g: torch.Generator) -> dict:
        ids = random_windows(split, batch_size, seq_len, g)
        if arch == "encoder":
            x, y = mask_tokens(ids, corpus.mask_id, corpus.vocab_size, corpus.n_special, g)
        elif arch == "seq2seq":
            x, y = span_corrupt(ids, corpus.sentinels, corpus.eos_id, g)
        else:
            x, y = ids, ids
        return {"input_ids": x, "labels": y}

    return batch


def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict], dtype: torch.dtype | None = None) -> float:
    """Mean loss of ``model`` over ``batches`` in eval mode, under autocast to ``dtype`` unless None."""
    was_training = model.training
    model.eval()
    device_type = next(model.parameters()).device.type
    losses = []
    for b in batches:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            losses.append(model(**b).loss.float().item())
    model.train(was_training)
    return sum(losses) / len(losses)


def train(
    model: torch.nn.Module,
    get_batch: Callable[[int], dict],
    steps: int,
    lr: float,
    warmup: int = 0,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    eval_every: int = 100,
    eval_sets: dict[str, list[dict]] | None = None,
    dtype: torch.dtype | None = None,
    warmup_lambda: int = 0,
    progress: bool = True,
    accum: int = 1,
    ckpt: Checkpointer | None = None,
    losses: list[float] | None = None,
    switch: tuple[int, Callable[[torch.nn.Module], object]] | None = None,
    compile: str | None = None,
) -> dict[str, list]:
    """Train ``model`` for ``steps`` AdamW steps on ``get_batch(step)``; return the loss curves.

    Losses on each of ``eval_sets`` (name -> fixed batches) are recorded every ``eval_every`` steps and
    at the end as ``curves[name + "_loss"]``. ``dtype`` is an autocast dtype (bf16; fp16 also scales the
    loss with a ``torch.amp.GradScaler``, whose state checkpoints keep) or None (fp32);
    ``warmup_lambda`` blends quantized layers in from full precision over that many steps.

    ``switch = (k, convert)`` (continual QAT): ``convert(model)`` runs once, at the start of step ``k``
    (before that step's loss measurement, so curve points from ``k`` on are of the converted model; on a
    resume from a checkpoint at or after ``k``, right after loading it). It must convert the model in place
    and keep its parameters (as `tritium.quantize` does), so that the optimizer state carries over;
    RuntimeError otherwise. With a switch, ``warmup_lambda`` counts from step ``k``. ``compile`` is a
    ``torch.compile`` backend (e.g. "inductor") to run the model with, or None.

    ``get_batch(step)`` is the global batch; under torch.distributed (``model`` wrapped by
    `distributed.wrap`) each rank trains on its slice, in ``accum`` micro-batches. ``ckpt`` saves and
    resumes checkpoints; SIGTERM/SIGINT then write one at the next step boundary and exit with
    ``128 + signal``. ``losses`` receives the training loss of every step (mean over the global batch).
    """
    from tqdm.auto import tqdm

    import tritium

    from . import distributed
    from .checkpoint import StopSignal

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    blend = tritium.LambdaWarmup(model, warmup_lambda) if warmup_lambda and switch is None else None

    switched = False

    def do_switch() -> None:
        nonlocal blend, switched
        switched = True
        params = [id(p) for p in model.parameters()]
        switch[1](model)
        if [id(p) for p in model.parameters()] != params:
            raise RuntimeError("the continual-QAT conversion replaced parameters of the model, so the "
                               "optimizer would lose them; convert in place keeping the parameters")
        if warmup_lambda:
            blend = tritium.LambdaWarmup(model, warmup_lambda)

    curves: dict[str, list] = {"step": []}
    losses = [] if losses is None else losses
    start = 0
    meta = ckpt.restore(model, opt) if ckpt is not None else None
    if meta is not None:
        start, curves, losses[:] = meta["step"], meta["curves"], meta["losses"]
    if switch is not None and meta is not None and start >= switch[0]:
        do_switch()  # the checkpoint holds the converted model's (identically named) parameters
    if meta is not None and blend is not None and meta.get("lambda") is not None:  # None: saved before the switch
        blend.load_state_dict(meta["lambda"])
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=dtype == torch.float16)
    if meta is not None and meta.get("grad_scaler"):  # the fp16 loss scale, for an exact resume
        scaler.load_state_dict(meta["grad_scaler"])
    if compile:
        model.compile(backend=compile)
    device_type = next(model.parameters()).device.type
    model.train()
    bar = tqdm(range(start, steps + 1), disable=not progress, leave=False)
    with StopSignal(enabled=ckpt is not None) as stop:
        for step in bar:
            if switch is not None and not switched and step == switch[0]:
                do_switch()
            if eval_sets and (step % eval_every == 0 or step == steps):
                curves["step"].append(step)
                for name, batches in eval_sets.items():
                    curves.setdefault(f"{name}_loss", []).append(evaluate(model, batches, dtype))
                bar.set_postfix({k: f"{v[-1]:.3f}" for k, v in curves.items() if k.endswith("_loss")})
            if step == steps:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup, min_lr_ratio)
            batch = get_batch(step)
            micro = distributed.shard(batch, accum)
            total = torch.zeros(())
            for i, b in enumerate(micro):
                with distributed.grad_sync(model, i == len(micro) - 1), \
                        torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                    loss = model(**b).loss / len(micro)
                scaler.scale(loss).backward()
                total += loss.detach().float().cpu()
            if grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if blend is not None:
                blend.step()
            losses.append(distributed.mean(total).item())
            if ckpt is None:
                continue
            stopping = distributed.any_rank(stop.signum is not None)
            if ckpt.due(step + 1) or stopping:
                ckpt.save(step + 1, model, opt, {
                    "curves": curves, "losses": losses, "lambda": blend.state_dict() if blend else None,
                    "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "data": {"next_step": step + 1}, "global_batch": len(next(iter(batch.values()))),
                    "lr_schedule": {"steps": steps, "lr": lr, "warmup": warmup, "min_lr_ratio": min_lr_ratio,
                                    "last_lr": opt.param_groups[0]["lr"]},
                })
            if stopping:
                print(f"stopped by signal {stop.signum} after step {step + 1}; checkpoint written", flush=True)
                raise SystemExit(128 + (stop.signum or 0))
    return curves


def switch_step(fraction: float, steps: int) -> int:
    """The step at which continual QAT converts the model: ``fraction * steps`` rounded half up."""
    return math.floor(fraction * steps + 0.5)


def _corpus(cfg: dict, args: argparse.Namespace):
    from tritium.data.corpus import load_corpus

    return load_corpus(args.corpus, Path(args.out) / "tokenizers", vocab_size=cfg["vocab_size"],
                       kind=cfg["tokenizer"], val_fraction=cfg["val_fraction"],
                       data_dir=getattr(args, "data_dir", None))


def build(cfg: dict, corpus) -> torch.nn.Module:
    """The untrained full-precision model of a run config."""
    from tritium.models.transformers import build_model, masked_positions_only

    model = build_model(cfg["task"], corpus.vocab_size, cfg["hidden"], cfg["layers"], cfg["seq_len"],
                        cfg["head_dim"], cfg["dropout"], corpus.pad_id, corpus.bos_id, corpus.eos_id)
    return masked_positions_only(model) if cfg["task"] == "encoder" else model


def run_one(cfg: dict, args: argparse.Namespace) -> dict:
    """Train and evaluate one run (see the module docstring)."""
    import tritium
    from tritium.models.transformers import quantize_excludes

    from . import checkpoint, distributed
    from .runner import run_key

    precision = tritium.parse_precision(cfg["precision"])
    torch.manual_seed(cfg["seed"])
    corpus = _corpus(cfg, args)
    exclude = quantize_excludes(cfg["task"], cfg.get("quantize_heads", False), cfg.get("exclude"))

    def make_model() -> torch.nn.Module:
        model = build(cfg, corpus)
        if precision.train is not None and precision.switch_at is None:
            tritium.quantize(model, precision.train, exclude=exclude)
        return model

    switch = None
    if precision.switch_at is not None:  # continual QAT: float first, then converted in place
        switch = (switch_step(precision.switch_at, cfg["steps"]),
                  lambda m: tritium.quantize(distributed.unwrap(m), precision.train, exclude=exclude))

    model = make_model()
    dev = distributed.device()
    dtype = precision.autocast_dtype

    bs, sl = cfg["batch_size"], cfg["seq_len"]
    train_split = corpus.train[: cfg["train_tokens"]] if cfg.get("train_tokens") else corpus.train
    if len(train_split) <= sl:
        raise ValueError(f"train_tokens={cfg.get('train_tokens')}: {len(train_split)} training tokens do not make "
                         f"one window of {sl}")
    train_batch = make_batch_fn(cfg["task"], corpus, train_split, bs, sl)
    val_batch = make_batch_fn(cfg["task"], corpus, corpus.val, bs, sl)
    g = torch.Generator().manual_seed(1234)  # the same evaluation batches for every run
    eval_sets = {"train": [train_batch(g) for _ in range(cfg["eval_batches"])],
                 "val": [val_batch(g) for _ in range(cfg["eval_batches"])]}
    eval_sets = {k: [{n: t.to(dev) for n, t in b.items()} for b in v] for k, v in eval_sets.items()}

    def get_batch(step: int) -> dict:  # the data order depends on (seed, step) only
        b = train_batch(torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step))
        return {n: t.to(dev) for n, t in b.items()}

    work = Path(args.work_dir) if getattr(args, "work_dir", None) else None
    fp32_ckpt = None
    if precision.ptq is not None and work is not None:  # reuse the matching float run's weights when present
        fp32_ckpt = work.parent / run_key({**cfg, "precision": str(precision.before_ptq)}) / "final.safetensors"
    t0 = time.perf_counter()
    if fp32_ckpt is not None and fp32_ckpt.is_file():
        from safetensors.torch import load_file

        model.to(dev).load_state_dict(load_file(fp32_ckpt, device=str(dev)))
        curves = {"step": [cfg["steps"]], "train_loss": [evaluate(model, eval_sets["train"], dtype)],
                  "val_loss": [evaluate(model, eval_sets["val"], dtype)]}
    else:
        model = distributed.wrap(model.to(dev), getattr(args, "fsdp", False))
        ckpt = None if work is None else checkpoint.Checkpointer(
            work / "ckpt", getattr(args, "ckpt_every", 0), getattr(args, "keep_ckpts", 2),
            getattr(args, "resume", False))
        curves = train(
            model, get_batch, cfg["steps"], cfg["lr"], cfg["warmup"], cfg["min_lr_ratio"], cfg["weight_decay"],
            eval_every=cfg["eval_every"], eval_sets=eval_sets, dtype=dtype,
            warmup_lambda=cfg.get("warmup_lambda", 0), progress=not getattr(args, "no_progress", False),
            accum=getattr(args, "grad_accum", 1), ckpt=ckpt, switch=switch, compile=getattr(args, "compile", None),
        )
        if distributed.is_fsdp(model):  # continue with an unsharded copy on every rank
            model = distributed.unsharded_copy(model, make_model().to(dev))
        model = distributed.unwrap(model)
        if precision.family == "fp" and work is not None and distributed.is_main():
            work.mkdir(parents=True, exist_ok=True)
            checkpoint.save_tensors(work / "final.safetensors", model.state_dict())
        distributed.barrier()  # every rank sees final.safetensors before a later ptq- run looks for it
    train_s = time.perf_counter() - t0
    out = {} if switch is None else {"switch_step": switch[0]}
    if precision.ptq is not None:
        out["fp32_val_loss"] = curves["val_loss"][-1]  # before PTQ (under the autocast, if any)
        tritium.ptq(model, precision.ptq, exclude=exclude)
        curves["step"].append(cfg["steps"])  # the last point of the curves is after PTQ
        curves["train_loss"].append(evaluate(model, eval_sets["train"], dtype))
        curves["val_loss"].append(evaluate(model, eval_sets["val"], dtype))
    val, tr = curves["val_loss"][-1], curves["train_loss"][-1]
    if getattr(args, "save_model", False) and work is not None and distributed.is_main():
        out["model_file"] = str(save_model(model, corpus.tokenizer, work / "model.safetensors"))
    n_tokens = cfg["steps"] * bs * sl
    out["train_split_tokens"] = len(train_split)
    out.update({
        "val_loss": val, "train_loss": tr, "ppl": math.exp(min(val, 50.0)), "gap": val - tr,
        "params": sum(p.numel() for p in model.parameters()), "tokens": n_tokens,
        "train_s": round(train_s, 2), **tritium.summary(model).as_dict(), "curves": curves,
    })
    return out


def save_model(model: torch.nn.Module, tokenizer: object, path: Path) -> Path:
    """Save a trained model with its tokenizer at ``path`` (`tritium.save`, which stores the model's class and
    config), its quantized layers frozen in place first, so that `tritium.load_pretrained` and ``tritium generate``
    run it as it was evaluated."""
    import tritium

    if any(True for _ in tritium.convert.bit_layers(model)):
        tritium.freeze(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tritium.save(model.eval(), path, tokenizer=tokenizer)
    return path


def variant(row: dict) -> str:
    """The precision of a row plus its non-default conversion options, e.g. "1.58-absmedian fp:EncDecAttention"."""
    parts = [row["precision"]]
    if row.get("exclude"):
        parts.append("fp:" + "|".join(row["exclude"]))
    if row.get("quantize_heads"):
        parts.append("q-heads")
    if row.get("warmup_lambda"):
        parts.append(f"λ-warmup{row['warmup_lambda']}")
    return " ".join(parts)


def match_hidden(hidden: list[int], losses: list[float], target: float) -> tuple[float, str]:
    """Smallest hidden size where the loss curve (piecewise linear in log hidden) reaches ``target``.

    Returns ``(hidden, qualifier)``: "=" interpolated, "<=" reached already at the smallest measured size,
    ">" not reached in the measured range (hidden is then the largest measured size).
    """
    pts = sorted(zip(hidden, losses, strict=True))
    if pts[0][1] <= target:
        return float(pts[0][0]), "<="
    for (h0, l0), (h1, l1) in pairwise(pts):
        if l1 <= target:
            t = (l0 - target) / (l0 - l1)
            return 2 ** (math.log2(h0) + t * (math.log2(h1) - math.log2(h0))), "="
    return float(pts[-1][0]), ">"


def hidden_factors(ref: dict[int, float], curve: dict[int, float]) -> dict[int, tuple[float, str]]:
    """Per reference hidden size h: the factor k (with qualifier, see `match_hidden`) such that ``curve``
    at k*h reaches the loss ``ref[h]``."""
    hs = sorted(curve)
    out = {}
    for h, target in sorted(ref.items()):
        found, qual = match_hidden(hs, [curve[x] for x in hs], target)
        out[h] = (found / h, qual)
    return out


def format_factor(factor: float, qual: str) -> str:
    """``1.9x``, ``<= 0.5x`` or ``> 8x``."""
    return f"{factor:.2g}x" if qual == "=" else f"{qual} {factor:.2g}x"


def _means(rows: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """``{variant: {hidden: mean metric over seeds}}``."""
    acc: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if isinstance(r.get(metric), (int, float)):
            acc.setdefault(variant(r), {}).setdefault(r["hidden"], []).append(float(r[metric]))
    return {v: {h: sum(x) / len(x) for h, x in d.items()} for v, d in acc.items()}


def _order(v: str) -> tuple:
    from .report import precision_order

    p, _, rest = v.partition(" ")
    return (*precision_order(p), rest)


def _family(v: str) -> str | None:
    """`tritium.Precision.family` of a variant's precision (None if it is not one)."""
    from tritium.config import parse_precision

    try:
        return parse_precision(v.partition(" ")[0]).family
    except ValueError:
        return None


def plot_scaling(rows: list[dict], path: Path, title: str = "") -> Path:
    """Final training and validation loss against hidden size (log axis), one line per precision."""
    from .report import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("train_loss", "val_loss"), strict=True):
        means = _means(rows, metric)
        for v in sorted(means, key=_order):
            hs = sorted(means[v])
            ax.plot(hs, [means[v][h] for h in hs], marker="o", ms=3, lw=1, label=v,
                    ls="--" if _family(v) == "ptq" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size")
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"


def _finite(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _by_seed(rows: list[dict], metric: str) -> dict[str, dict[int, dict[int, float]]]:
    """``{variant: {hidden: {seed: metric}}}`` over the rows with a finite ``metric``."""
    out: dict[str, dict[int, dict[int, float]]] = {}
    for r in rows:
        x = _finite(r.get(metric))
        if x is not None:
            out.setdefault(variant(r), {}).setdefault(r["hidden"], {})[r.get("seed", 0)] = x
    return out


def spread(values: list[float]) -> tuple[float, float, float]:
    """Mean, minimum and maximum of per-seed values."""
    return sum(values) / len(values), min(values), max(values)


def format_spread(values: list[float], digits: int = 3, signed: bool = True, unit: str = "") -> str:
    """``+0.120 [+0.100, +0.140]``: the mean and the range over seeds; a single value alone."""
    def f(x: float) -> str:
        return f"{round(x, digits) + 0.0:{'+' if signed else ''}.{digits}f}{unit}"  # + 0.0: no "-0.000"

    m, lo, hi = spread(values)
    return f(m) if len(values) == 1 else f"{f(m)} [{f(lo)}, {f(hi)}]"


def complete_sizes(table: dict[str, dict[int, dict[int, float]]], name: str, seeds: list[int]) -> list[int]:
    """The hidden sizes at which variant ``name`` has every seed of ``seeds`` (none when ``seeds`` is empty)."""
    return sorted(h for h, by in table.get(name, {}).items() if seeds and all(s in by for s in seeds))


def paired(table: dict[str, dict[int, dict[int, float]]], a: str, b: str,
           seeds: list[int]) -> dict[int, list[float]]:
    """Per hidden size at which variants ``a`` and ``b`` both have every seed of ``seeds``: the
    differences ``a - b``, seed by seed (in the order of ``seeds``)."""
    both = sorted(set(complete_sizes(table, a, seeds)) & set(complete_sizes(table, b, seeds)))
    return {h: [table[a][h][s] - table[b][h][s] for s in seeds] for h in both}


def seed_factors(table: dict[str, dict[int, dict[int, float]]], ref: str, v: str,
                 seeds: list[int]) -> dict[int, list[tuple[float, str]]]:
    """Per reference hidden size h: the hidden-size factor (`hidden_factors`) of each seed, the curve of
    ``v`` against the curve of ``ref`` of the same seed. The reference sizes are those where ``ref`` has
    every seed, the curve spans every size where ``v`` has every seed (also beyond the reference's largest);
    empty when the curve has fewer than two sizes or the reference none."""
    hs_ref, hs_v = complete_sizes(table, ref, seeds), complete_sizes(table, v, seeds)
    if len(hs_v) < 2 or not hs_ref:
        return {}
    per_seed = [hidden_factors({h: table[ref][h][s] for h in hs_ref}, {h: table[v][h][s] for h in hs_v})
                for s in seeds]
    return {h: [f[h] for f in per_seed] for h in hs_ref}


def format_factors(factors: list[tuple[float, str]]) -> str:
    """``1.94x [1.90x, 1.98x]`` (mean and range over seeds) when every seed's factor is measured ("="),
    else the seeds' factors one by one (``1.9x / > 8x``)."""
    if all(q == "=" for _, q in factors):
        return format_spread([f for f, _ in factors], digits=2, signed=False, unit="x")
    return " / ".join(format_factor(*f) for f in factors)


def factor_verdict(factors: list[tuple[float, str]], low: float = 1.5, high: float = 3.0) -> str:
    """"reproduced" when every seed's factor lies within [low, high]; "not reproduced (1.58 bits need
    less)" or "... much more)" when every one lies below or above; else "undecided"."""
    def side(f: float, q: str) -> str:
        if q == "=":
            return "in" if low <= f <= high else "less" if f < low else "more"
        if q == ">":  # the factor is above f
            return "more" if f >= high else "?"
        return "less" if f < low else "?"  # "<=": the factor is at most f

    sides = {side(f, q) for f, q in factors}
    if sides == {"in"}:
        return "reproduced"
    if sides == {"less"}:
        return "not reproduced (1.58 bits need less)"
    if sides == {"more"}:
        return "not reproduced (1.58 bits need much more)"
    return "undecided"


def _count(diffs: dict[int, list[float]], test: Callable[[float, float], bool]) -> int:
    """How many hidden sizes have a range over seeds [min, max] that passes ``test(min, max)``."""
    return sum(test(min(d), max(d)) for d in diffs.values())


def _sizes(k: int, diffs: dict) -> str:
    return f"{k} of {len(diffs)} size{'s' if len(diffs) != 1 else ''}"


def plot_loss_curves(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Validation (solid) and training (dotted) loss against step, mean over seeds: one panel per hidden
    size, one colour per precision; PTQ rows (no training curve of their own) are left out. None when no
    row has curves."""
    from .report import _plt

    curves = [r for r in rows if _family(variant(r)) != "ptq" and isinstance(r.get("curves"), dict)
              and r["curves"].get("step")]
    if not curves:
        return None
    plt = _plt()
    hs = sorted({r["hidden"] for r in curves})
    vs = sorted({variant(r) for r in curves}, key=_order)
    color = {v: f"C{i % 10}" for i, v in enumerate(vs)}
    fig, axes = plt.subplots(1, len(hs), figsize=(3.4 * len(hs) + 0.5, 3.2), squeeze=False)
    for ax, h in zip(axes[0], hs, strict=True):
        late: list[float] = []  # the losses after the first quarter of the steps, to zoom in on
        for v in vs:
            cs = [r["curves"] for r in curves if r["hidden"] == h and variant(r) == v]
            for key, ls, alpha in (("val_loss", "-", 1.0), ("train_loss", ":", 0.6)):
                ok = [c for c in cs if c.get(key)]
                if not ok:
                    continue
                n = min(min(len(c[key]), len(c["step"])) for c in ok)
                ys = [sum(c[key][t] for c in ok) / len(ok) for t in range(n)]
                ax.plot(ok[0]["step"][:n], ys, ls=ls, alpha=alpha, lw=1, color=color[v])
                late += [y for y in ys[n // 4:] if math.isfinite(y)]
        if late:
            pad = 0.05 * (max(late) - min(late)) or 0.1
            ax.set_ylim(min(late) - pad, max(late) + pad)
        ax.set_title(f"hidden {h}", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss (mean over seeds)", fontsize=7)
    handles = [plt.Line2D([], [], color=color[v], label=v) for v in vs]
    handles += [plt.Line2D([], [], color="gray", ls="-", label="validation"),
                plt.Line2D([], [], color="gray", ls=":", label="training")]
    ncol = min(len(handles), 4)
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=ncol)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.02 + 0.06 * math.ceil(len(handles) / ncol), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _counterparts(variants: list[str]) -> dict[str, list]:
    """The pairs of variants the report compares: "qat" (1.58-bit QAT, float reference), "measure"
    (absmedian, absmean QAT), "ptq" (PTQ, the same quantizer as QAT), "cqat" (continual QAT, plain QAT or
    None, float reference or None). Reference and counterpart share the variant's conversion options."""
    import dataclasses

    from tritium.config import Precision, parse_precision

    parsed = {}
    for v in variants:
        p, _, rest = v.partition(" ")
        try:
            parsed[v] = (parse_precision(p), rest)
        except ValueError:
            pass

    def find(p: Precision, rest: str) -> str | None:
        return next((w for w in sorted(parsed, key=_order) if parsed[w] == (p, rest)), None)

    out: dict[str, list] = {"qat": [], "measure": [], "ptq": [], "cqat": []}
    for v in sorted(parsed, key=_order):
        p, rest = parsed[v]
        ref = find(Precision(autocast=p.autocast), rest)
        if p.family == "ptq" and (q := find(Precision(p.ptq, p.autocast), rest)):
            out["ptq"].append((v, q))
        if p.family != "qat":
            continue
        if p.switch_at is not None:
            out["cqat"].append((v, find(dataclasses.replace(p, switch_at=None), rest), ref))
            continue
        if p.nominal_bits == 1.58 and ref:
            out["qat"].append((v, ref))
        if p.train.measure == "absmedian":
            mean = find(dataclasses.replace(p, train=dataclasses.replace(p.train, measure="absmean")), rest)
            if mean:
                out["measure"].append((v, mean))
    return out


def matched_gaps(train: dict, gap: dict, q: str, ref: str, seeds: list[int]) -> dict[int, list[float]]:
    """Per hidden size h where every seed allows it: ``gap(q, h) - gap_ref(train_loss(q, h))`` seed by seed,
    where ``gap_ref(t)`` is the reference's train-val gap interpolated (linearly, between the two hidden sizes
    whose training losses bracket ``t``) at the training loss ``t`` that ``q`` reached: the gap difference
    at equal fit rather than at equal size."""
    out: dict[int, list[float]] = {}
    for h in sorted(set(train.get(q, {})) & set(gap.get(q, {}))):
        diffs = []
        for s in seeds:
            pts = sorted((train[ref][x][s], gap[ref][x][s]) for x in train.get(ref, {})
                         if s in train[ref][x] and x in gap.get(ref, {}) and s in gap[ref][x])
            if s not in train[q][h] or s not in gap[q][h]:
                break
            t = train[q][h][s]
            seg = next(((a, b) for a, b in pairwise(pts) if a[0] <= t <= b[0]), None)
            if seg is None:  # outside the reference's range of training losses
                break
            (t0, g0), (t1, g1) = seg
            ref_gap = g0 if t1 == t0 else g0 + (t - t0) / (t1 - t0) * (g1 - g0)
            diffs.append(gap[q][h][s] - ref_gap)
        else:
            if diffs:
                out[h] = diffs
    return out


def _factor_answer(factors: dict[int, list[tuple[float, str]]], hs: list[int], verdict: bool = True) -> str:
    """The hidden-size factor at the smallest reference size where every seed's factor is measured (else
    the smallest), after the verdict on "about 2x" when ``verdict``."""
    h = next((h for h in sorted(factors) if all(q == "=" for _, q in factors[h])), min(factors))
    fs = factors[h]
    text = (f"**{factor_verdict(fs)}**: " if verdict else "") + f"{format_factors(fs)} hidden at reference hidden {h}"
    if all(q == ">" for _, q in fs):
        text += f" (not reached up to hidden {max(hs)})"
    elif all(q == "<=" for _, q in fs):
        text += " (reached already at the smallest size)"
    return text


def _answers(task: str, rows: list[dict], seeds: list[int], pairs: dict[str, list]) -> tuple[list[str], list]:
    """The bullets of the answers section and the rows of the paired-difference table."""
    val, gap, train = _by_seed(rows, "val_loss"), _by_seed(rows, "gap"), _by_seed(rows, "train_loss")
    hs_all = sorted({r["hidden"] for r in rows})
    bullets: list[str] = []
    diffs: list[tuple[str, dict[int, list[float]]]] = []
    for q, ref in pairs["qat"]:
        d = paired(val, q, ref, seeds)
        diffs.append((f"val_loss: {q} - {ref}", d))
        if task == "decoder":
            diffs.append((f"gap: {q} - {ref}", paired(gap, q, ref, seeds)))
        factors = seed_factors(val, ref, q, seeds)
        if task == "encoder":
            claim = f"- Encoder claim (1.58 bits need about 2x the hidden size of {ref}), {q}: "
            bullets.append(claim + (_factor_answer(factors, hs_all) if factors else
                                    "_not measurable yet_ (needs two hidden sizes with every seed)"))
        elif task == "seq2seq":
            claim = f"- Encoder-decoder claim (stays worse at 1.58 bits), {q}: "
            if not d:
                bullets.append(claim + "_not measurable yet_ (no hidden size with every seed)")
                continue
            h = max(d)
            word = ("reproduced" if min(d[h]) > 0 else "not reproduced (1.58 bits at least as good)"
                    if max(d[h]) <= 0 else "undecided")
            text = (f"**{word}**: val loss - {ref} = {format_spread(d[h])} at hidden {h}, worse at "
                    f"{_sizes(_count(d, lambda lo, hi: lo > 0), d)}")
            if factors:
                text += f"; width to match {ref}: {_factor_answer(factors, hs_all, verdict=False)}"
            bullets.append(claim + text)
        elif task == "decoder":
            claim = f"- Decoder claim (a regularising effect: smaller train-val gap), {q}: "
            g = paired(gap, q, ref, seeds)
            if not g:
                bullets.append(claim + "_not measurable yet_ (no hidden size with every seed)")
                continue
            h = max(g)
            smaller = [x for x in g if max(g[x]) < 0]
            m = matched_gaps(train, gap, q, ref, seeds)
            diffs.append((f"gap at {ref}'s gap for equal train loss: {q} - {ref}", m))
            fit_smaller = _count(m, lambda lo, hi: hi < 0)
            if len(smaller) <= len(g) / 2:
                word = ("not reproduced (gap not smaller)" if _count(g, lambda lo, hi: lo >= 0) > len(g) / 2
                        else "undecided")
            elif not m:
                word = "undecided (gap smaller at equal size; equal-fit comparison not measurable yet)"
            elif fit_smaller > len(m) / 2:
                word = "reproduced"
            else:
                word = "not reproduced beyond the weaker fit"
            text = (f"**{word}**: gap - {ref} gap = {format_spread(g[h])} at hidden {h}, smaller at "
                    f"{_sizes(len(smaller), g)}")
            if m:
                hm = max(m)
                text += (f"; at equal training loss (the {ref} gap interpolated at the training loss {q} "
                         f"reached) {format_spread(m[hm])} at hidden {hm}, smaller at {_sizes(fit_smaller, m)}")
            dv = {x: d[x] for x in g if x in d}
            if dv:
                worse, better = _count(dv, lambda lo, hi: lo > 0), _count(dv, lambda lo, hi: hi < 0)
                text += (f"; val loss - {ref} = {format_spread(dv[max(dv)])} at hidden {max(dv)}, worse at "
                         f"{_sizes(worse, dv)}" + (f", better at {better}" if better else ""))
                if smaller and all(x in dv and min(dv[x]) > 0 for x in smaller):
                    text += ": smaller gap, but from underfitting, not better generalisation"
                elif smaller and all(x in dv and max(dv[x]) < 0 for x in smaller):
                    text += ": smaller gap and better validation loss, i.e. better generalisation"
            bullets.append(claim + text)
    for med, mean in pairs["measure"]:
        d = paired(val, med, mean, seeds)
        diffs.append((f"val_loss: {med} - {mean}", d))
        if not d:
            continue
        better, worse = _count(d, lambda lo, hi: hi < 0), _count(d, lambda lo, hi: lo > 0)
        par = len(d) - better - worse
        word = ("on par" if par == len(d) else "absmedian better" if better == len(d)
                else "absmean better" if worse == len(d) else "absmedian on par or better" if not worse
                else "absmean on par or better" if not better else "mixed")
        h = max(d)
        bullets.append(f"- Median vs mean ({med} - {mean} val loss): **{word}**: {format_spread(d[h])} at hidden "
                       f"{h}; absmedian better at {better}, on par at {par}, worse at {_sizes(worse, d)}")
    means = _means(rows, "val_loss")
    for p, q in pairs["ptq"]:
        hs = sorted(set(means.get(p, {})) & set(means.get(q, {})))
        if not hs:
            continue
        qat_better = sum(means[q][h] < means[p][h] for h in hs)
        word = ("QAT better" if qat_better == len(hs) else "PTQ better" if qat_better == 0 else "mixed")
        h = hs[-1]
        bullets.append(f"- PTQ vs QAT ({p} vs {q} val loss, mean over seeds): **{word}**: "
                       f"{means[p][h]:.3f} vs {means[q][h]:.3f} at hidden {h}; QAT better at "
                       f"{qat_better} of {len(hs)} size{'s' if len(hs) != 1 else ''}")
    for c, q, ref in pairs["cqat"]:
        parts = []
        for other in (q, ref):
            if other is None:
                continue
            d = paired(val, c, other, seeds)
            diffs.append((f"val_loss: {c} - {other}", d))
            if d:
                h = max(d)
                word = "better" if max(d[h]) < 0 else "worse" if min(d[h]) > 0 else "on par"
                better, worse = _count(d, lambda lo, hi: hi < 0), _count(d, lambda lo, hi: lo > 0)
                parts.append(f"**{word}** {'with' if word == 'on par' else 'than'} {other}: {format_spread(d[h])} "
                             f"at hidden {h} (better at {better}, "
                             f"worse at {_sizes(worse, d)})")
        if parts:
            bullets.append(f"- Continual QAT {c} val loss: " + "; ".join(parts))
    return bullets, diffs


def report(rows: list[dict], out: Path) -> str:
    """Answers to the paper's claims with ranges over seeds (paired by seed), the paired differences, the
    loss curves, then the scaling plot, hidden-size factors, train-val gaps and PTQ from means over seeds."""
    rows = [r for r in rows if "hidden" in r and "precision" in r]
    if not rows:
        return ""
    task = rows[0]["task"]
    out = Path(out)
    seeds = sorted({r.get("seed", 0) for r in rows})
    hs = sorted({r["hidden"] for r in rows})
    pairs = _counterparts(list(_means(rows, "val_loss")))
    bullets, diffs = _answers(task, rows, seeds, pairs)
    n = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    parts = [f"### {task}: answers", "",
             f"Paired by seed (the runs of one seed see the same batches): mean [min, max] of the per-seed values, "
             f"the range over {n}; a hidden size where a seed is missing is left out.", ""]
    parts += bullets or ["_nothing to compare yet_"]
    parts.append("")
    diffs = [(label, d) for label, d in diffs if d]
    if diffs:
        parts += [f"Paired differences (mean [min, max] over {n}; negative: the first is lower):", "",
                  _table(["difference", *map(str, hs)],
                         [[label, *(format_spread(d[h]) if h in d else "" for h in hs)] for label, d in diffs])]
    if task in ("encoder", "seq2seq"):
        val = _by_seed(rows, "val_loss")
        body = []
        for q, ref in pairs["qat"]:
            f = seed_factors(val, ref, q, seeds)
            if f:
                body.append([f"{q} vs {ref}", *(format_factors(f[h]) if h in f else "" for h in hs)])
        if body:
            parts += ["Hidden-size factor per seed (seed s of 1.58 bits against seed s of the float run; mean "
                      f"[min, max] over {n}, or each seed's factor when one is not measured):", "",
                      _table(["precision vs reference", *(f"reference @ {h}" for h in hs)], body)]
    curves = plot_loss_curves(rows, out / f"{task}_loss_curves.png", title=f"{task}: loss curves")
    if curves:
        parts += [f"![{task} loss curves]({curves.name})", ""]
    path = plot_scaling(rows, out / f"{task}_scaling.png", title=f"{task}: final loss vs hidden size")
    parts += [f"### {task}: scaling with hidden size", "", f"![{task} scaling]({path.name})", ""]
    for metric in ("train_loss", "val_loss"):
        means = _means(rows, metric)
        ref = next((v for v in sorted(means, key=_order) if _family(v) == "fp" and " " not in v), None)
        quant = [v for v in sorted(means, key=_order) if _family(v) in ("qat", "ptq")]
        if ref is None or not quant:
            continue
        body, sentences = [], []
        for v in quant:
            f = hidden_factors(means[ref], means[v])
            body.append([v, *(format_factor(*f[h]) if h in f else "" for h in hs)])
            h0 = min(f)
            sentences.append(f"- {v} needs {format_factor(*f[h0])} hidden to match {ref} {metric} at hidden {h0}"
                             + (" (not reached in the measured range)" if f[h0][1] == ">" else ""))
        parts += [f"Hidden-size factor at which each precision reaches the {ref} `{metric}` of a given hidden "
                  f"size (piecewise-linear interpolation in log hidden; `>`: not reached, `<=`: already "
                  f"reached at the smallest size):", "",
                  _table(["precision", *(f"{ref} @ {h}" for h in hs)], body), *sentences, ""]
    gap = _means(rows, "gap")
    parts += ["Train-validation gap (final validation minus training loss, mean over seeds):", "",
              _table(["precision", *map(str, hs)],
                     [[v, *(f"{gap[v][h]:.3f}" if h in gap[v] else "" for h in hs)] for v in sorted(gap, key=_order)]),
              ""]
    ptq = [v for v in sorted(gap, key=_order) if _family(v) == "ptq"]
    if ptq:
        fp, q = _means(rows, "fp32_val_loss"), _means(rows, "val_loss")
        body = [[v, *(f"{fp[v][h]:.3f} → {q[v][h]:.3f}" if h in q.get(v, {}) and h in fp.get(v, {}) else ""
                      for h in hs)] for v in ptq]
        parts += ["Post-training quantization: validation loss of the float model → after `tritium.ptq`:", "",
                  _table(["precision", *map(str, hs)], body), ""]
    return "\n".join(parts)
