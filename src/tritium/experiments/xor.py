"""XOR toy task: XOR of two inputs plus noise inputs, a two-layer MLP; reports the first-layer weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from tritium.args import nonnegative_int, positive_int

METRIC = "test_acc"
HIGHER_IS_BETTER = True
GROUP_BY = ()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--hidden", type=positive_int, default=None)
    parser.add_argument("--noise", type=nonnegative_int, default=None, help="number of noise inputs")


def grid(args: argparse.Namespace, protocol: dict) -> list[dict]:
    from .runner import precisions, seeds

    return [
        {"task": "xor", "precision": p, "seed": s, "noise": args.noise, "hidden": args.hidden,
         "epochs": args.epochs, "lr": protocol["lr"], "n_train": protocol["n_train"],
         "n_test": protocol["n_test"], "optimizer": "adamw", "weight_decay": protocol["weight_decay"]}
        for p in precisions(args) for s in seeds(args)
    ]


def run_one(cfg: dict, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import tritium
    from tritium import quant
    from tritium.data.xor import make_xor
    from tritium.models import XorMLP

    from .runner import progress

    torch.manual_seed(cfg["seed"])
    x, y = make_xor(cfg["n_train"], cfg["noise"], seed=1000 + cfg["seed"])
    xt, yt = make_xor(cfg["n_test"], cfg["noise"], seed=2000 + cfg["seed"])
    precision = tritium.parse_precision(cfg["precision"])
    model = XorMLP(2 + cfg["noise"], cfg["hidden"])
    if precision.train is not None:
        tritium.quantize(model, precision.train)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    curves: dict[str, list] = {"step": [], "train_loss": [], "train_acc": []}
    scaler = precision.grad_scaler()
    for epoch in progress(range(cfg["epochs"]), args, desc="epochs"):
        model.train()
        with precision.autocast_context():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if (epoch + 1) % 10 == 0 or epoch == 0:
            curves["step"].append(epoch + 1)
            curves["train_loss"].append(loss.item())
            curves["train_acc"].append((logits.argmax(-1) == y).float().mean().item())
    if precision.ptq is not None:
        tritium.ptq(model, precision.ptq)
    model.eval()
    with torch.no_grad():
        with precision.autocast_context():
            train_acc = (model(x).argmax(-1) == y).float().mean().item()
            test_acc = (model(xt).argmax(-1) == yt).float().mean().item()
        fc1 = model.fc1
        if isinstance(fc1, tritium.BitLinear):
            q, s = quant.quantize_weight(fc1.weight, fc1.config)
            w = q.float()
        else:
            w = fc1.weight.detach()
    noise_cols = w[:, 2:]
    return {
        "test_acc": test_acc, "train_acc": train_acc, "last_val_acc": test_acc, "best_val_acc": test_acc,
        "final_train_loss": curves["train_loss"][-1],
        "noise_weight_zero_frac": float((noise_cols == 0).float().mean()) if noise_cols.numel() else 1.0,
        "fc1_weight": [[round(float(v), 4) for v in row] for row in w],
        "curves": curves,
        **tritium.summary(model).as_dict(),
    }


def report(rows: list[dict], out: Path) -> str:
    """First-layer weights (integer levels for quantized runs) of seed 0 of each precision."""
    from .report import precision_order

    lines = ["### XOR: first-layer weights (seed 0)", "",
             "Rows are hidden units, columns the inputs (x1, x2, then noise). Quantized runs show the "
             "integer weight levels (for 1.58 bits: -1, 0, +1).", ""]
    by_prec: dict[str, list[dict]] = {}
    for r in rows:
        by_prec.setdefault(r["precision"], []).append(r)
    lines += ["| precision | runs | test acc 100% | all noise weights zero | both | mean share of zero noise weights |",
              "|---|---:|---:|---:|---:|---:|"]
    for p in sorted(by_prec, key=precision_order):
        rs = by_prec[p]
        acc = [r["test_acc"] == 1.0 for r in rs]
        zero = [r["noise_weight_zero_frac"] == 1.0 for r in rs]
        share = sum(r["noise_weight_zero_frac"] for r in rs) / len(rs)
        both = sum(a and z for a, z in zip(acc, zero, strict=True))
        lines.append(f"| {p} | {len(rs)} | {sum(acc)} | {sum(zero)} | {both} "
                     f"| {share:.2f} |")
    lines.append("")
    for r in sorted((r for r in rows if r["seed"] == 0), key=lambda r: precision_order(r["precision"])):
        w = r["fc1_weight"]
        lines += [f"`{r['precision']}` (test acc {100 * r['test_acc']:.1f}%):", "", "```"]
        lines += [" ".join(f"{v + 0.0:7.3g}" for v in row) for row in w]
        lines += ["```", ""]
    return "\n".join(lines)
