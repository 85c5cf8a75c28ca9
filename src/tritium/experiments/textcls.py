"""Text classification with WideMLP (``tritium run mlp``) on text_gcn-layout datasets.

Training: AdamW, linear learning-rate decay to zero over all steps, cross-entropy, mini-batches of
shuffled documents. The word embedding gets sparse gradients and `tritium.optim.LazyAdamW`, which gives
every row AdamW's update at every step (the same float32 arithmetic as a dense update) but applies the
zero-gradient updates of a row only when a forward next reads it.

Input features (``--features``, `tritium.data.textcls`): ``words`` (the default) or ``wordpiece`` (a
bert-base-uncased-style WordPiece tokenizer trained on the training split, as the paper's input layer reads
BERT WordPiece ids). A run config names its features only when they are not ``words``, so words runs keep
the keys of the results recorded before the option existed; every row records them as "features" (rows
without the field are words runs, and the report reads them so).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tritium.args import choice_list, comma_list, nonnegative_int, positive_int

METRIC = "test_acc"
HIGHER_IS_BETTER = True
GROUP_BY = ("input_layer", "features", "dataset")
FEATURES = ("words", "wordpiece")
DEFAULT_FEATURES = "words"
#: Fields that rows recorded before they existed lack, and the values such rows had (the report fills them in).
ROW_DEFAULTS = {"features": DEFAULT_FEATURES}
_features = choice_list(*FEATURES)
#: Test accuracy (%) of Nielsen et al. (2024), Table 1.
PAPER = {
    "fp32": {"20ng": 83.31, "R8": 97.27, "R52": 93.89, "ohsumed": 63.95, "MR": 76.72},
    "1.58-absmean": {"20ng": 79.89, "R8": 97.40, "R52": 93.54, "ohsumed": 60.75, "MR": 77.10},
    "1.58-absmedian": {"20ng": 80.08, "R8": 97.35, "R52": 94.20, "ohsumed": 62.28, "MR": 76.14},
}
HYPER = ("epochs", "batch_size", "lr", "weight_decay", "hidden", "dropout", "min_count", "val_fraction",
         "split_seed", "input_layer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None, type=comma_list,
                        help="comma list of text_gcn datasets (R8, R52, 20ng, ...)")
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--batch-size", type=positive_int, default=None)
    parser.add_argument("--hidden", type=positive_int, default=None)
    parser.add_argument("--min-count", type=nonnegative_int, default=None, help="drop words rarer than this in train")
    parser.add_argument("--input-layer", choices=("embedding", "linear"), default=None,
                        help="embedding: EmbeddingBag kept in full precision (paper); linear: a Linear over "
                             "the bag-of-words vector, quantized too")
    parser.add_argument("--features", type=_features, default=None,
                        help="comma list of input features: words (lowercased words, the default) or wordpiece "
                             "(a bert-base-uncased-style WordPiece tokenizer trained on the training split)")


def features_of(args: argparse.Namespace, protocol: dict) -> list[str]:
    """The input features to run: ``--features``, else the protocol's, else words; ValueError if unknown or
    if wordpiece is asked for without the ``tokenizers`` package."""
    value = getattr(args, "features", None) or protocol.get("features") or DEFAULT_FEATURES
    try:
        features = list(dict.fromkeys(_features(value).split(",")))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--features: {e}") from None
    if "wordpiece" in features:
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            raise ValueError("--features wordpiece needs the tokenizers package: "
                             "pip install 'tritium[transformers]'") from None
    return features


def grid(args: argparse.Namespace, protocol: dict) -> list[dict]:
    from .runner import precisions, seeds

    hyper = {k: getattr(args, k, None) if getattr(args, k, None) is not None else protocol[k] for k in HYPER}
    datasets = [d.strip() for d in str(args.dataset).split(",") if d.strip()]
    return [{"task": "mlp", "dataset": d, "precision": p, "seed": s, "model": "widemlp", **hyper,
             **({} if f == DEFAULT_FEATURES else {"features": f})}
            for d in datasets for f in features_of(args, protocol) for s in seeds(args) for p in precisions(args)]


def _accuracy(model, split, precision, batch_size: int = 1024) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad(), precision.autocast_context():
        for i in range(0, len(split), batch_size):
            index = torch.arange(i, min(i + batch_size, len(split)))
            ids, offsets = split.batch(index)
            correct += (model(ids, offsets).argmax(-1) == split.labels[index]).sum().item()
    return correct / max(len(split), 1)


def run_one(cfg: dict, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import tritium
    from tritium.data.textcls import load_text_gcn
    from tritium.models import WideMLP
    from tritium.optim import LazyAdamW

    from .runner import progress

    features = cfg.get("features", DEFAULT_FEATURES)
    ds = load_text_gcn(cfg["dataset"], args.data_dir, cfg["min_count"], cfg["val_fraction"], cfg["split_seed"],
                       features)
    torch.manual_seed(cfg["seed"])
    model = WideMLP(len(ds.vocab), len(ds.classes), cfg["hidden"], cfg["dropout"], cfg["input_layer"])
    precision = tritium.parse_precision(cfg["precision"])
    if precision.train is not None:
        tritium.quantize(model, precision.train)
    if isinstance(model.embed, torch.nn.EmbeddingBag):
        model.embed.sparse = True
    opt = LazyAdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    opt.watch(model)
    steps_per_epoch = math.ceil(len(ds.train) / cfg["batch_size"])
    total = cfg["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / total))
    g = torch.Generator().manual_seed(cfg["seed"])
    curves: dict[str, list] = {"step": [], "train_loss": [], "val_acc": [], "test_acc": []}
    best_val, test_at_best = -1.0, 0.0
    scaler = precision.grad_scaler()
    for epoch in progress(range(cfg["epochs"]), args, desc=f"{cfg['dataset']} {cfg['precision']}"):
        model.train()
        perm = torch.randperm(len(ds.train), generator=g)
        loss_sum = 0.0
        for i in range(0, len(perm), cfg["batch_size"]):
            index = perm[i: i + cfg["batch_size"]]
            ids, offsets = ds.train.batch(index)
            with precision.autocast_context():
                loss = F.cross_entropy(model(ids, offsets), ds.train.labels[index])
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += loss.item() * len(index)
        opt.sync()
        val_acc, test_acc = _accuracy(model, ds.val, precision), _accuracy(model, ds.test, precision)
        if val_acc > best_val:
            best_val, test_at_best = val_acc, test_acc
        curves["step"].append(epoch + 1)
        curves["train_loss"].append(loss_sum / len(ds.train))
        curves["val_acc"].append(val_acc)
        curves["test_acc"].append(test_acc)
    if precision.ptq is not None:
        tritium.ptq(model, precision.ptq)
    test_acc = _accuracy(model, ds.test, precision)
    return {
        "test_acc": test_acc, "last_val_acc": _accuracy(model, ds.val, precision), "best_val_acc": best_val,
        "test_acc_at_best_val": test_at_best, "final_train_loss": curves["train_loss"][-1],
        "vocab_size": len(ds.vocab), "n_train": len(ds.train), "n_val": len(ds.val), "n_test": len(ds.test),
        "curves": curves, **tritium.summary(model).as_dict(), **({} if "features" in cfg else {"features": features}),
        **({"tokenizer_sha256": ds.tokenizer} if ds.tokenizer else {}),
    }


def report(rows: list[dict], out: Path) -> str:
    """Test accuracy against the paper, validation accuracies and data sizes per input layer, features,
    dataset and precision (`runner.write_report` gives rows without "features" the `ROW_DEFAULTS`)."""
    from .report import paper_comparison, summary_table

    published = {("embedding", f, d, p): v for p, per in PAPER.items() for d, v in per.items() for f in FEATURES}
    parts = ["### WideMLP: test accuracy against the paper", "", paper_comparison(rows, GROUP_BY, METRIC, published),
             "### WideMLP: best validation accuracy", "", summary_table(rows, GROUP_BY, "best_val_acc"),
             "### WideMLP: test accuracy at the epoch of best validation accuracy", "",
             summary_table(rows, GROUP_BY, "test_acc_at_best_val")]
    sizes = {(r["dataset"], r["features"]): r for r in rows}
    parts += ["### Data", "", "| dataset | features | vocab | train | val | test |", "|---|---|---:|---:|---:|---:|"]
    parts += [f"| {d} | {f} | {r['vocab_size']} | {r['n_train']} | {r['n_val']} | {r['n_test']} |"
              for (d, f), r in sizes.items()]
    return "\n".join(parts) + "\n"
