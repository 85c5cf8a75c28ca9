"""``tritium run TASK``: run a grid of experiments, append one JSON line per finished run, report.

A task is a module registered in `TASKS`. It provides:

* ``add_arguments(parser)``: its own options. Options that a protocol may set should default to None;
  the runner fills every None option whose name is a protocol key from the protocol.
* ``grid(args, protocol) -> list[dict]``: one JSON-able config per run, with at least "task",
  "precision" and "seed" plus the other axes and the hyperparameters used (no file paths).
* ``run_one(cfg, args) -> dict``: train and evaluate one run; returns metrics, optionally "curves"
  (``{"step": [...], "<name>": [...]}``) and the ``tritium.summary(model).as_dict()`` counts.
* ``METRIC``, ``HIGHER_IS_BETTER``, ``GROUP_BY``: the main metric and the axes of the summary table.
* optional ``DISTRIBUTED = True``: the task trains under torchrun (``--nproc``, ``--fsdp``) and writes and
  resumes checkpoints (``--ckpt-every``, ``--resume``); other tasks reject those options.
* optional ``report(rows, out) -> str``: extra markdown for ``DIR/results.md``.

Every run has a stable key (hash of its sorted JSON config); runs whose key is already in
``DIR/results.jsonl`` are skipped, so rerunning into the same ``--out`` resumes. Each row is one
``write`` + fsync of one line; a torn last line (an interrupted write) is ignored and cut off before
the next append. A run gets ``args.work_dir`` (``DIR/runs/<key>``, not created) for checkpoints, and
only the process with ``RANK`` 0 (the default) writes results, so tasks may train under torchrun.

Precisions are spec strings (``tritium.parse_spec``): ``fp32``, ``1.58-absmedian``, ``4-absmax``, ...;
``ptq-<spec>`` means train in fp32, then ``tritium.ptq`` with ``<spec>``, then evaluate.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType

TASKS: dict[str, str] = {
    "mlp": "tritium.experiments.textcls",
    "gnn": "tritium.experiments.gnn",
    "xor": "tritium.experiments.xor",
    "encoder": "tritium.experiments.lm",
    "seq2seq": "tritium.experiments.lm",
    "decoder": "tritium.experiments.lm",
}
PROTOCOL_DIR = Path(__file__).parent / "protocols"
RESULTS = "results.jsonl"
REPORT = "results.md"


def load_task(name: str) -> ModuleType:
    """The task module registered as ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[name])


def load_protocol(task: str, name: str) -> dict:
    """The hyperparameters of protocol ``name`` for ``task`` (``protocols/<task>_<name>.json``)."""
    path = PROTOCOL_DIR / f"{task}_{name}.json"
    if not path.is_file():
        have = sorted(p.stem.split("_", 1)[1] for p in PROTOCOL_DIR.glob(f"{task}_*.json"))
        raise FileNotFoundError(f"no protocol {name!r} for task {task!r} ({path}); available: {have}")
    return json.loads(path.read_text())


def run_key(cfg: dict) -> str:
    """Stable identifier of a run config."""
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def split_precision(precision: str) -> tuple[str, str | None]:
    """``(spec to train with, spec for post-training quantization or None)`` of a precision string."""
    import tritium

    p = precision.strip().lower()
    if p.startswith("ptq-"):
        tritium.parse_spec(p[4:])
        return "fp32", p[4:]
    tritium.parse_spec(p)
    return p, None


def nominal_bits(precision: str) -> float:
    """Weight bits a precision string names (fp32 = 32, bf16/fp16 = 16, ternary = 1.58)."""
    import tritium

    p = precision.lower().removeprefix("ptq-")
    cfg = tritium.parse_spec(p)
    if cfg is None:
        return 32.0 if p == "fp32" else 16.0
    return float(cfg.weight_bits)


def progress(iterable, args: argparse.Namespace, **kwargs):
    """A tqdm progress bar over ``iterable`` unless ``--no-progress``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=getattr(args, "no_progress", False), leave=False, **kwargs)


def read_rows(path: Path) -> list[dict]:
    """The rows of a results.jsonl file; an incomplete or unreadable last line is ignored."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1:]):
                print(f"warning: {path}: skipping unreadable line {i + 1}", file=sys.stderr)
    return rows


def repair(path: Path) -> None:
    """Cut a torn last line (no final newline) off ``path`` so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data[: data.rfind(b"\n") + 1]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(keep)
    os.replace(tmp, path)


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line with a single write, flushed and fsynced."""
    line = (json.dumps(row, sort_keys=False) + "\n").encode()
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def add_common(parser: argparse.ArgumentParser) -> None:
    """The options every task has."""
    parser.add_argument("--precision", default=None,
                        help="comma list of specs, e.g. fp32,1.58-absmean,1.58-absmedian,ptq-1.58-absmedian,"
                             "4-absmax (default: the protocol's)")
    parser.add_argument("--seeds", default=None,
                        help="N: seeds 0..N-1; or A-B (A..B) or a comma list, to split seeds over machines "
                             "(default: the protocol's)")
    parser.add_argument("--protocol", default="quick", help="hyperparameter set: quick (default) or paper")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a protocol hyperparameter (VALUE parsed as JSON), repeatable")
    parser.add_argument("--data-dir", default=None,
                        help="data root (default: $TRITIUM_DATA, else ../shared/data, else ~/.cache/tritium/data)")
    parser.add_argument("--download", action="store_true", help="print where to get missing data")
    parser.add_argument("--out", required=True, type=Path, help="results folder (resumable)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes on this machine (re-runs this command under torchrun)")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP under torchrun")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per step; the batch size stays the global batch, split over "
                             "processes x accumulation steps")
    parser.add_argument("--ckpt-every", type=int, default=0,
                        help="checkpoint every N steps into DIR/runs/<key>/ckpt (0: only on SIGTERM/SIGINT)")
    parser.add_argument("--keep-ckpts", type=int, default=2, help="checkpoints kept per run (0: all)")
    parser.add_argument("--resume", action="store_true", help="continue unfinished runs from their checkpoints")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-command per task, each with the common options and the task's own."""
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, module_name in TASKS.items():
        p = sub.add_parser(name, help=f"{module_name}")
        add_common(p)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            p.set_defaults(unavailable=f"task {name!r} is not available ({module_name} is missing)")
            continue
        module.add_arguments(p)


def apply_protocol(args: argparse.Namespace) -> dict:
    """Load the protocol, apply ``--set`` overrides, fill unset (None) options from it; return it."""
    protocol = load_protocol(args.task, args.protocol)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            protocol[key] = json.loads(value)
        except json.JSONDecodeError:
            protocol[key] = value
    protocol.setdefault("precision", "fp32,1.58-absmedian")
    protocol.setdefault("seeds", 1)
    for key, value in protocol.items():
        if getattr(args, key, None) is None and key != "protocol":
            setattr(args, key, value)
    return protocol


def precisions(args: argparse.Namespace) -> list[str]:
    """The precision list of ``--precision``, validated."""
    items = args.precision.split(",") if isinstance(args.precision, str) else list(args.precision)
    out = [p.strip().lower() for p in items if p.strip()]
    for p in out:
        split_precision(p)
    return out


def seeds(args: argparse.Namespace) -> list[int]:
    """The seeds of ``--seeds``: ``N`` means 0..N-1, ``A-B`` A..B, ``A,B,...`` those."""
    text = str(args.seeds).strip()
    try:
        if "," in text:
            out = [int(s) for s in text.split(",") if s.strip()]
        elif "-" in text.lstrip("-"):
            lo, hi = text.split("-", 1)
            out = list(range(int(lo), int(hi) + 1))
        else:
            out = list(range(int(text)))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected N, A-B or a comma list of seeds") from None
    if not out or min(out) < 0:
        raise ValueError(f"--seeds {text!r}: expected at least one seed, none negative")
    return out


def run(args: argparse.Namespace) -> int:
    """Run the task's grid into ``args.out``, skipping finished runs, then write the report.

    Returns 0, or 2 with a message when the task is unavailable or a file (e.g. a dataset) is missing.
    """
    if getattr(args, "unavailable", None):
        print(args.unavailable, file=sys.stderr)
        return 2
    try:
        return _run(args)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        if getattr(args, "download", False):
            print("tritium downloads nothing: fetch the files from the source named above into the data "
                  "root (--data-dir or $TRITIUM_DATA).", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from . import distributed

    task = load_task(args.task)
    wanted = [flag for flag, on in (("--nproc", args.nproc > 1), ("--fsdp", args.fsdp),
                                    ("--ckpt-every", args.ckpt_every > 0), ("--resume", args.resume),
                                    ("torchrun", int(os.environ.get("WORLD_SIZE", "1")) > 1)) if on]
    if wanted and not getattr(task, "DISTRIBUTED", False):
        have = sorted(name for name in TASKS if getattr(load_task(name), "DISTRIBUTED", False))
        print(f"error: task {args.task!r} does not support {', '.join(wanted)}: distributed training and "
              f"checkpoints are implemented for {', '.join(have)}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        distributed.launch(args.nproc)
    distributed.init()
    try:
        return _run_task(args, task)
    finally:
        distributed.teardown()


def _run_task(args: argparse.Namespace, task: ModuleType) -> int:
    protocol = apply_protocol(args)
    try:
        args.precision = ",".join(precisions(args))
        seeds(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    main = os.environ.get("RANK", "0") == "0"
    out: Path = args.out
    path = out / RESULTS
    if main:
        out.mkdir(parents=True, exist_ok=True)
        repair(path)
    done = {r.get("key") for r in read_rows(path)}
    runs = task.grid(args, protocol)
    todo = [(run_key(cfg), cfg) for cfg in runs]
    todo = [(k, c) for k, c in todo if k not in done]
    print(f"{args.task}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run -> {path}")
    if args.dry_run:
        for k, c in todo:
            print(k, json.dumps(c, sort_keys=True))
        return 0
    for i, (key, cfg) in enumerate(todo):
        axes = " ".join(f"{k}={v}" for k, v in cfg.items() if k in (*task.GROUP_BY, "precision", "seed"))
        print(f"[{i + 1}/{len(todo)}] {axes}", flush=True)
        args.work_dir = out / "runs" / key
        t0 = time.perf_counter()
        metrics = task.run_one(cfg, args)
        wall = time.perf_counter() - t0
        clash = set(metrics) & (set(cfg) | {"key", "wall_s", "finished_at"})
        if clash:
            raise ValueError(f"task {args.task!r} returned metrics that clash with config keys: {sorted(clash)}")
        if isinstance(metrics.get("curves"), dict):
            metrics["curves"] = {k: [round(v, 5) if isinstance(v, float) else v for v in vs]
                                 for k, vs in metrics["curves"].items()}
        row = {"key": key, **cfg, **metrics, "wall_s": round(wall, 3),
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if main:
            append_row(path, row)
        shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
        print("   " + " ".join(f"{k}={v:.4f}" for k, v in shown.items()) + f" ({wall:.1f}s)", flush=True)
    if main:
        text = write_report(out)
        print(text)
    return 0


def write_report(out: Path) -> str:
    """Rewrite ``out/results.md`` and the plots from every row of ``out/results.jsonl``; return the text."""
    from . import report

    rows = read_rows(out / RESULTS)
    parts = ["# Results", ""]
    for task_name in sorted({r["task"] for r in rows if "task" in r}):
        task_rows = [r for r in rows if r.get("task") == task_name]
        task = load_task(task_name)
        parts.append(report.generic_report(task_rows, out, task_name, task.GROUP_BY, task.METRIC,
                                           task.HIGHER_IS_BETTER))
        if hasattr(task, "report"):
            parts.append(task.report(task_rows, out))
    text = "\n".join(parts).rstrip() + "\n"
    write_atomic(out / REPORT, text)
    return text
