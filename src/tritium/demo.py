"""``tritium demo``: train one small MLP on scikit-learn's bundled digits at fp32 and 1.58 bits.

Same model, data split, seed and optimizer for every precision; only ``tritium.quantize`` differs.
Each quantized model is then frozen to packed 2-bit weights, saved, loaded into an empty skeleton and
evaluated again: the whole path from training to serving.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import tritium
from tritium.args import comma_list, nonnegative_int, positive_int

PRECISIONS = ("fp32", "1.58-absmean", "1.58-absmedian")


def load_digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The 1797 8x8 digit images of scikit-learn (shipped with it), split 80/20, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    x, y = sk_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def make_mlp(hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, 10))


def train_one(precision: str, data, epochs: int, seed: int = 0) -> dict:
    """Train, evaluate and size one model; returns a row of the demo table."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = tritium.quantize(make_mlp(), precision)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(ytr) + 63) // 64))
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr)).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits = model(xte)
    row = {"precision": precision, "test_acc": (logits.argmax(-1) == yte).float().mean().item(),
           "bits_per_weight": tritium.summary(model).bits_per_weight, "train_s": seconds}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        try:  # packed 2-bit weights where the kernels apply; other specs are saved as trained
            tritium.freeze(model)
        except ValueError:
            pass
        tritium.save(model, path)
        if any(isinstance(m, tritium.TernaryLinear) for m in model.modules()):  # serve it from the file
            served = tritium.load(path, model=tritium.quantize(make_mlp().to("meta"), precision))
            with torch.inference_mode():
                row["frozen_equal"] = torch.equal(served(xte), logits)
        row["file_kib"] = path.stat().st_size / 1024
    return row


def format_table(rows: list[dict]) -> str:
    lines = [f"{'precision':<16} {'test acc':>9} {'bits/weight':>12} {'file':>10} {'train time':>11} "
             f"{'frozen = trained':>17}"]
    for r in rows:
        same = {True: "yes (bit-exact)", False: "NO", None: "-"}[r.get("frozen_equal")]
        lines.append(
            f"{r['precision']:<16} {r['test_acc'] * 100:>8.2f}% {r['bits_per_weight']:>12.2f} "
            f"{r['file_kib']:>6.1f} KiB {r['train_s']:>10.1f}s {same:>17}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=positive_int, default=40, help="training epochs per precision (default 40)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads (default 1: the model is too small to gain from more)")
    parser.add_argument("--precision", type=spec_list, default=",".join(PRECISIONS),
                        help="comma-separated precision specs (default: %(default)s)")


def spec_list(value: object) -> str:
    """A non-empty comma list of `tritium.parse_spec` specs, returned as given."""
    text = comma_list(value)
    for spec in text.split(","):
        try:
            tritium.parse_spec(spec)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    data = load_digits(args.seed)
    print(f"digits: {len(data[1])} train / {len(data[3])} test images, MLP 64-256-256-10, "
          f"{args.epochs} epochs, torch threads: {torch.get_num_threads()}")
    rows = []
    for precision in args.precision.split(","):
        rows.append(train_one(precision.strip(), data, args.epochs, args.seed))
        print(f"  trained {precision}: test acc {rows[-1]['test_acc'] * 100:.2f}%", flush=True)
    print()
    print(format_table(rows))
    print("\nbits/weight: 1.58 per ternary weight, 32 per full-precision parameter (biases stay fp32).\n"
          "file: the saved safetensors file; 1.58-bit models are frozen first (2-bit packed weights).\n"
          "frozen = trained: the frozen model, loaded back from its file, gives the trained model's logits.")
    return 0 if all(r.get("frozen_equal", True) for r in rows) else 1
