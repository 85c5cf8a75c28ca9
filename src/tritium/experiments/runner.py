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
* optional ``CONTINUAL_QAT = True``: the task runs ``cqat<F>-`` precisions; other tasks reject them.
* optional ``report(rows, out) -> str``: extra markdown for ``DIR/results.md``.

Every run has a stable key (hash of its sorted JSON config); runs whose key is already in
``DIR/results.jsonl`` are skipped, so rerunning into the same ``--out`` resumes. Each row is one
``write`` + fsync of one line (`tritium.atomic`); a torn last line (an interrupted write) is ignored and
cut off before the next append. Several ``tritium run`` processes may share one ``--out``: before training
a run, a process claims its key with an exclusive ``flock`` on ``DIR/.claims/<key>`` (released when the run
ends or the process dies) and, under the lock of ``DIR/.lock``, checks that no row for it exists yet; rows
are appended and the report written under that lock too, so no run is trained twice and no row is doubled
or lost. A run gets ``args.work_dir`` (``DIR/runs/<key>``, not created) for checkpoints, and only the
process with ``RANK`` 0 (the default) writes results and claims runs, so tasks may train under torchrun.

Every option and ``--set KEY=VALUE`` is checked before anything starts (``--set`` values with the type of
the option of that name, else `SETTINGS`, else against the protocol's value); a bad one raises
`tritium.cli.UsageError`, which the command line prints as one line with exit status 2.

Precisions are `tritium.Precision` strings: ``fp32``, ``bf16``, ``fp16``, any spec (``1.58-absmedian``,
``4-absmax``, ...), ``ptq-<spec>`` (train in float, then ``tritium.ptq`` with ``<spec>``, then evaluate), and
``+bf16``/``+fp16`` after a spec to train and evaluate under autocast; runs record the canonical string.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from .. import atomic
from ..args import (
    UsageError,
    boolean,
    check,
    fraction,
    nonnegative_float,
    nonnegative_int,
    output_dir,
    positive_float,
    positive_int,
    precision_list,
    probability,
)

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
LOCK = ".lock"
CLAIMS = ".claims"
#: Checks of protocol hyperparameters that no option of the task names (options are checked by their type).
SETTINGS: dict[str, Callable[[object], object]] = {
    "lr": positive_float, "weight_decay": nonnegative_float, "dropout": probability, "epochs": positive_int,
    "hidden": positive_int, "k": positive_int, "n_train": positive_int, "n_test": positive_int,
    "split_seed": nonnegative_int, "val_fraction": fraction, "normalize_features": boolean,
}


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
    atomic.write_bytes(path, data[: data.rfind(b"\n") + 1])


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line with a single write, flushed and fsynced."""
    atomic.append_line(path, (json.dumps(row, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of results folder ``out`` (``out/.lock``) while reading or writing its rows."""
    with open(out / LOCK, "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def claim(out: Path, key: str) -> int | None:
    """Claim run ``key`` of ``out`` for this process: the descriptor of ``out/.claims/<key>``, locked with
    ``flock``, or None if another live process holds that claim (a dead process's lock is gone)."""
    folder = out / CLAIMS
    folder.mkdir(exist_ok=True)
    fd = os.open(folder / key, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release(out: Path, key: str, fd: int) -> None:
    """Give up the claim of run ``key`` taken by `claim`."""
    (out / CLAIMS / key).unlink(missing_ok=True)
    os.close(fd)


def claimed_elsewhere(out: Path, key: str) -> bool:
    """Whether another live process holds the claim of run ``key`` of ``out``."""
    try:
        fd = os.open(out / CLAIMS / key, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _protocol_name(text: str) -> str:
    if not text or not all(c.isalnum() or c in "-_" for c in text):
        raise argparse.ArgumentTypeError(f"expected a protocol name such as quick or paper, got {text!r}")
    return text


def _data_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return text


def add_common(parser: argparse.ArgumentParser) -> None:
    """The options every task has."""
    parser.add_argument("--precision", default=None, type=precision_list,
                        help="comma list of specs, e.g. fp32,1.58-absmean,1.58-absmedian,ptq-1.58-absmedian,"
                             "4-absmax (default: the protocol's)")
    parser.add_argument("--seeds", default=None, type=_seeds_type,
                        help="N: seeds 0..N-1; or A-B (A..B) or a comma list, to split seeds over machines "
                             "(default: the protocol's)")
    parser.add_argument("--protocol", default="quick", type=_protocol_name,
                        help="hyperparameter set: quick (default) or paper")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a protocol hyperparameter (VALUE parsed as JSON), repeatable")
    parser.add_argument("--data-dir", default=None, type=_data_dir,
                        help="data root (default: $TRITIUM_DATA, else ../shared/data, else ~/.cache/tritium/data)")
    parser.add_argument("--download", action="store_true", help="print where to get missing data")
    parser.add_argument("--out", required=True, type=output_dir,
                        help="results folder (resumable; several processes may share it)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="data-parallel processes on this machine (re-runs this command under torchrun)")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP under torchrun")
    parser.add_argument("--grad-accum", type=positive_int, default=1,
                        help="micro-batches per step; the batch size stays the global batch, split over "
                             "processes x accumulation steps")
    parser.add_argument("--ckpt-every", type=nonnegative_int, default=0,
                        help="checkpoint every N steps into DIR/runs/<key>/ckpt (0: only on SIGTERM/SIGINT)")
    parser.add_argument("--keep-ckpts", type=positive_int, default=2, help="checkpoints kept per run (default 2)")
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


def _task_options(task: str) -> dict[str, argparse.Action]:
    """The options of ``tritium run TASK`` by destination name."""
    parser = argparse.ArgumentParser(add_help=False)
    add_common(parser)
    load_task(task).add_arguments(parser)
    return {a.dest: a for a in parser._actions}


def _same_kind(value: object, default: object) -> bool:
    """Whether a ``--set`` value may replace the protocol's ``default`` (numbers for numbers, ...)."""
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(default):
        return number(value)
    if isinstance(default, (bool, list, dict)):
        return isinstance(value, type(default))
    return not isinstance(value, (list, dict)) or default is None


def setting(task: str, protocol: dict, item: str) -> tuple[str, object]:
    """``(key, value)`` of one ``--set KEY=VALUE`` (VALUE parsed as JSON, else taken as text), checked like
    the option of that name, else against the protocol's value; `UsageError` if unknown or invalid."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set {item!r}: expected KEY=VALUE")
    options = _task_options(task)
    common = set(_common_options())
    if key not in protocol and (key not in options or key in common - {"precision", "seeds"}):
        known = sorted(set(protocol) | (set(options) - common) | {"precision", "seeds"})
        raise UsageError(f"--set {item}: unknown setting {key!r} for task {task}; known: {', '.join(known)}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    where = f"--set {item}"
    action = options.get(key)
    if action is not None and isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return key, [check(v, action.type, where) if action.type else v for v in items]
    if action is not None and action.choices is not None:
        if value not in action.choices:
            raise UsageError(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
        return key, value
    if action is not None and action.type is None and action.nargs == 0:  # a flag such as --quantize-heads
        return key, check(value, boolean, where)
    if action is not None and action.type is not None:  # stored as the option would store it, except
        converted = check(",".join(map(str, value)) if isinstance(value, list) else value, action.type, where)
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(converted, float):
            return key, value  # an integer stays one, as in the run keys of earlier results
        return key, converted
    if key in SETTINGS:
        check(value, SETTINGS[key], where)
    if key in protocol and not _same_kind(value, protocol[key]):
        raise UsageError(f"{where}: expected a value like the protocol's {protocol[key]!r}, got {value!r}")
    return key, value


def _common_options() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    add_common(parser)
    return {a.dest: a for a in parser._actions}


def apply_protocol(args: argparse.Namespace) -> dict:
    """Load the protocol, apply ``--set`` overrides, fill unset (None) options from it; return it."""
    try:
        protocol = load_protocol(args.task, args.protocol)
    except FileNotFoundError as e:
        raise UsageError(f"--protocol {args.protocol}: {e}") from None
    for item in args.set:
        key, value = setting(args.task, protocol, item)
        protocol[key] = value
    protocol.setdefault("precision", "fp32,1.58-absmedian")
    protocol.setdefault("seeds", 1)
    for key, value in protocol.items():
        if getattr(args, key, None) is None and key != "protocol":
            setattr(args, key, value)
    return protocol


def precisions(args: argparse.Namespace) -> list[str]:
    """The canonical strings (`tritium.Precision`) of the ``--precision`` list, without repeats."""
    from tritium.config import parse_precision

    items = args.precision.split(",") if isinstance(args.precision, str) else list(args.precision)
    return list(dict.fromkeys(str(parse_precision(p)) for p in items if p.strip()))


def _seed_list(text: str) -> list[int]:
    try:
        if "," in text:
            out = [int(s) for s in text.split(",") if s.strip()]
        elif "-" in text.lstrip("-"):
            lo, hi = text.split("-", 1)
            out = list(range(int(lo), int(hi) + 1))
        else:
            out = list(range(int(text)))
    except ValueError:
        raise ValueError("expected N, A-B or a comma list of seeds") from None
    if not out or min(out) < 0:
        raise ValueError("expected at least one seed, none negative")
    return out


def seeds(args: argparse.Namespace) -> list[int]:
    """The seeds of ``--seeds``: ``N`` means 0..N-1, ``A-B`` A..B, ``A,B,...`` those."""
    text = str(args.seeds).strip()
    try:
        return _seed_list(text)
    except ValueError as e:
        raise ValueError(f"--seeds {text!r}: {e}") from None


def _seeds_type(value: object) -> object:
    try:
        _seed_list(str(value).strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}, got {str(value)!r}") from None
    return value


def run(args: argparse.Namespace) -> int:
    """Run the task's grid into ``args.out``, skipping finished runs, then write the report.

    Returns 0, or 2 with a message when the task is unavailable or a file (e.g. a dataset) is missing.
    """
    if getattr(args, "unavailable", None):
        print(f"error: {args.unavailable}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except FileExistsError as e:  # a run's checkpoints exist and --resume was not given
        print(f"error: {e}", file=sys.stderr)
        return 2
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
                                    ("--grad-accum", args.grad_accum > 1),
                                    ("--ckpt-every", args.ckpt_every > 0), ("--resume", args.resume),
                                    ("torchrun", int(os.environ.get("WORLD_SIZE", "1")) > 1)) if on]
    if wanted and not getattr(task, "DISTRIBUTED", False):
        have = sorted(name for name in TASKS if getattr(load_task(name), "DISTRIBUTED", False))
        print(f"error: task {args.task!r} does not support {', '.join(wanted)}: distributed training and "
              f"checkpoints are implemented for {', '.join(have)}", file=sys.stderr)
        return 2
    runs = _prepare(args, task)  # every check before any process is started
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        distributed.launch(args.nproc)
    distributed.init()
    try:
        return _run_task(args, task, runs)
    finally:
        distributed.teardown()


def _prepare(args: argparse.Namespace, task: ModuleType) -> list[dict]:
    """Apply the protocol to ``args``, check the options together and return the task's grid."""
    protocol = apply_protocol(args)
    try:
        args.precision = ",".join(precisions(args))
        seeds(args)
    except ValueError as e:
        raise UsageError(str(e) if str(e).startswith("--") else f"--precision: {e}") from None
    if not args.precision:
        raise UsageError("--precision: no precision given")
    if not getattr(task, "CONTINUAL_QAT", False):
        from tritium.config import parse_precision

        cqat = [p for p in args.precision.split(",") if parse_precision(p).switch_at is not None]
        if cqat:
            raise UsageError(f"--precision {cqat[0]}: the {args.task} task does not run continual QAT (cqat<F>-); "
                             "the lm tasks (encoder, seq2seq, decoder) do")
    _check_options(args)
    try:
        runs = task.grid(args, protocol)
    except ValueError as e:  # grids are built from the options alone
        raise UsageError(str(e)) from None
    if not args.resume and not args.dry_run:
        done = {r.get("key") for r in read_rows(args.out / RESULTS)}
        _refuse_checkpoints(args.out, [k for k in map(run_key, runs) if k not in done])
    return runs


def _run_task(args: argparse.Namespace, task: ModuleType, runs: list[dict]) -> int:
    from . import distributed

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    main = os.environ.get("RANK", "0") == "0"
    out: Path = args.out
    path = out / RESULTS
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {str(out)!r}: cannot create the folder ({e.strerror})") from None
        with locked(out):
            repair(path)
    done = {r.get("key") for r in read_rows(path)}
    todo = [(k, c) for k, c in ((run_key(cfg), cfg) for cfg in runs) if k not in done]
    print(f"{args.task}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run -> {path}")
    if args.dry_run:
        for k, c in todo:
            print(k, json.dumps(c, sort_keys=True))
        return 0
    for i, (key, cfg) in enumerate(todo):
        axes = " ".join(f"{k}={v}" for k, v in cfg.items() if k in (*task.GROUP_BY, "precision", "seed"))
        print(f"[{i + 1}/{len(todo)}] {axes}", flush=True)
        fd = claim(out, key) if main else None
        try:
            skip = None
            if main and fd is None:
                skip = "running in another process"
            elif main:
                with locked(out):
                    if key in {r.get("key") for r in read_rows(path)}:
                        skip = "finished by another process"
            if distributed.any_rank(skip is not None):  # every rank follows rank 0
                if skip:
                    print(f"   {skip}, skipped", flush=True)
                continue
            _run_one(args, task, out, path, key, cfg, main)
        finally:
            if fd is not None:
                release(out, key, fd)
    if main:
        with locked(out):
            text = write_report(out)
        print(text)
    return 0


def _run_one(args: argparse.Namespace, task: ModuleType, out: Path, path: Path, key: str, cfg: dict,
             main: bool) -> None:
    """Train and evaluate one claimed run and append its row."""
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
        with locked(out):
            repair(path)
            append_row(path, row)
    shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
    print("   " + " ".join(f"{k}={v:.4f}" for k, v in shown.items()) + f" ({wall:.1f}s)", flush=True)


def _check_options(args: argparse.Namespace) -> None:
    """Checks that involve several options: the global batch must split evenly over processes x
    accumulation steps, and every hidden size must be a multiple of the attention head size."""
    head_dim = getattr(args, "head_dim", None)
    if isinstance(head_dim, int) and getattr(args, "hidden", None) is not None:
        hidden = args.hidden if isinstance(args.hidden, list) else str(args.hidden).split(",")
        for h in hidden:
            if int(h) % head_dim:
                raise UsageError(f"--hidden {h} is not a multiple of --head-dim {head_dim}")
    batch = getattr(args, "batch_size", None)
    world = max(args.nproc, int(os.environ.get("WORLD_SIZE", "1")))
    parts = world * args.grad_accum
    if isinstance(batch, int) and parts > 1 and batch % parts:
        raise UsageError(f"--batch-size {batch} does not split over {world} processes x --grad-accum "
                         f"{args.grad_accum}: it must be a multiple of {parts}")


def _refuse_checkpoints(out: Path, keys: list[str]) -> None:
    """Without ``--resume``, unfinished runs that already have checkpoints are an error."""
    from .checkpoint import checkpoints

    have = [k for k in keys if checkpoints(out / "runs" / k / "ckpt") and not claimed_elsewhere(out, k)]
    if have:
        more = f" and {len(have) - 1} more" if len(have) > 1 else ""
        raise UsageError(f"--out {str(out)!r}: run {have[0]}{more} already has checkpoints "
                         f"({out / 'runs' / have[0] / 'ckpt'}); pass --resume to continue from them or delete "
                         "that folder to start over")


def write_report(out: Path) -> str:
    """Rewrite ``out/results.md`` and the plots from every row of ``out/results.jsonl``; return the text."""
    from . import report

    rows, keys = [], set()
    for r in read_rows(out / RESULTS):  # one row per run, even in a file written before runs were claimed
        if r.get("key") is None or r["key"] not in keys:
            rows.append(r)
            keys.add(r.get("key"))
    parts = ["# Results", ""]
    for task_name in sorted({r["task"] for r in rows if "task" in r}):
        task = load_task(task_name)
        defaults = getattr(task, "ROW_DEFAULTS", {})  # fields that older rows lack
        task_rows = [{**defaults, **r} for r in rows if r.get("task") == task_name]
        if hasattr(task, "report"):  # the task's own answers first
            parts.append(task.report(task_rows, out))
        parts.append(report.generic_report(task_rows, out, task_name, task.GROUP_BY, task.METRIC,
                                           task.HIGHER_IS_BETTER))
    text = "\n".join(parts).rstrip() + "\n"
    atomic.write_text(out / REPORT, text)
    return text
