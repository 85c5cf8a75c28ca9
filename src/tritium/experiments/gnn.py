"""Node classification with SGC and GCN on Planetoid graphs (``tritium run gnn``): full-batch AdamW.

Node features are the raw binary bag-of-words vectors (``normalize_features: false`` in both protocols,
which reproduces the paper's fp32 and 1.58-bit SGC within 0.1 point on Cora); ``--set
normalize_features=true`` row-normalises them (PyG's ``NormalizeFeatures``) as Kipf & Welling do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tritium.args import choice_list, comma_list, positive_int

METRIC = "test_acc"
HIGHER_IS_BETTER = True
GROUP_BY = ("arch", "dataset")
#: Test accuracy (%) of Nielsen et al. (2024), mean over 10 seeds.
PAPER = {
    ("sgc", "fp32"): {"Cora": 77.07, "CiteSeer": 63.66, "PubMed": 75.63},
    ("sgc", "1.58-absmean"): {"Cora": 77.31, "CiteSeer": 59.31, "PubMed": 75.22},
    ("sgc", "1.58-absmedian"): {"Cora": 77.46, "CiteSeer": 61.31, "PubMed": 74.42},
    ("gcn", "fp32"): {"Cora": 78.57, "CiteSeer": 63.76, "PubMed": 76.02},
    ("gcn", "1.58-absmean"): {"Cora": 76.03, "CiteSeer": 65.83, "PubMed": 73.51},
    ("gcn", "1.58-absmedian"): {"Cora": 75.76, "CiteSeer": 65.60, "PubMed": 73.23},
}
HYPER = ("epochs", "lr", "weight_decay", "hidden", "dropout", "k", "normalize_features")


def _datasets(value: object) -> str:
    from tritium.data.planetoid import NAMES

    text = comma_list(value)
    for name in text.split(","):
        if name.lower() not in NAMES:
            raise argparse.ArgumentTypeError(f"unknown dataset {name!r}; choose from {', '.join(NAMES.values())}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None, type=_datasets, help="comma list: Cora, CiteSeer, PubMed")
    parser.add_argument("--arch", default=None, type=choice_list("sgc", "gcn"), help="comma list: sgc, gcn")
    parser.add_argument("--epochs", type=positive_int, default=None)


def grid(args: argparse.Namespace, protocol: dict) -> list[dict]:
    from .runner import precisions, seeds

    runs = []
    for arch in str(args.arch).split(","):
        arch = arch.strip().lower()
        if arch not in ("sgc", "gcn"):
            raise ValueError(f"unknown arch {arch!r}; choose sgc or gcn")
        hyper = {k: protocol[arch][k] if isinstance(protocol.get(arch), dict) and k in protocol[arch]
                 else protocol[k] for k in HYPER}
        if args.epochs is not None:
            hyper["epochs"] = args.epochs
        if arch == "sgc":
            hyper.pop("hidden"), hyper.pop("dropout")
        else:
            hyper.pop("k")
        for d in str(args.dataset).split(","):
            runs += [{"task": "gnn", "arch": arch, "dataset": d.strip(), "precision": p, "seed": s, **hyper}
                     for s in seeds(args) for p in precisions(args)]
    return runs


def run_one(cfg: dict, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import tritium
    from tritium.data.planetoid import load_planetoid
    from tritium.models.gnn import GCN, SGC

    from .runner import progress

    data = load_planetoid(cfg["dataset"], args.data_dir, normalize_features=cfg["normalize_features"])
    torch.manual_seed(cfg["seed"])
    n_classes = int(data.y.max()) + 1
    if cfg["arch"] == "sgc":
        model = SGC(data.num_features, n_classes, k=cfg["k"])
    else:
        model = GCN(data.num_features, n_classes, hidden=cfg["hidden"], dropout=cfg["dropout"])
    precision = tritium.parse_precision(cfg["precision"])
    if precision.train is not None:
        tritium.quantize(model, precision.train)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    def accuracy() -> tuple[float, float]:
        model.eval()
        with torch.no_grad(), precision.autocast_context():
            pred = model(data.x, data.edge_index).argmax(-1)
        return tuple((pred[m] == data.y[m]).float().mean().item() for m in (data.val_mask, data.test_mask))

    curves: dict[str, list] = {"step": [], "train_loss": [], "val_acc": [], "test_acc": []}
    best_val, test_at_best = -1.0, 0.0
    scaler = precision.grad_scaler()
    for epoch in progress(range(cfg["epochs"]), args, desc=f"{cfg['arch']} {cfg['dataset']} {cfg['precision']}"):
        model.train()
        with precision.autocast_context():
            loss = F.cross_entropy(model(data.x, data.edge_index)[data.train_mask], data.y[data.train_mask])
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        val_acc, test_acc = accuracy()
        if val_acc > best_val:
            best_val, test_at_best = val_acc, test_acc
        for k, v in (("step", epoch + 1), ("train_loss", loss.item()), ("val_acc", val_acc), ("test_acc", test_acc)):
            curves[k].append(v)
    if precision.ptq is not None:
        tritium.ptq(model, precision.ptq)
    val_acc, test_acc = accuracy()
    return {"test_acc": test_acc, "last_val_acc": val_acc, "best_val_acc": best_val,
            "test_acc_at_best_val": test_at_best, "final_train_loss": curves["train_loss"][-1],
            "curves": curves, **tritium.summary(model).as_dict()}


def report(rows: list[dict], out: Path) -> str:
    """Test accuracy against the paper, and test accuracy at the epoch of best validation accuracy."""
    from .report import paper_comparison, summary_table

    published = {(a, d, p): v for (a, p), per in PAPER.items() for d, v in per.items()}
    return "\n".join(["### GNN: test accuracy against the paper", "",
                      paper_comparison(rows, GROUP_BY, METRIC, published),
                      "### GNN: test accuracy at the epoch of best validation accuracy", "",
                      summary_table(rows, GROUP_BY, "test_acc_at_best_val")])
