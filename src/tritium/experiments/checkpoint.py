"""Training checkpoints without pickle: one safetensors file of tensors plus a JSON sidecar.

``ckpt-STEP.safetensors`` holds the full (unsharded) model state (``model/<name>``), the optimizer state
tensors (``optim/<param name>/<key>``) and the random-number-generator states of rank 0 (``rng/torch``,
``rng/cuda``, ``rng/numpy``, ``rng/python`` as integer tensors). ``ckpt-STEP.json`` holds everything
else: format version, step, optimizer param groups (hyperparameters) and non-tensor state, the rest of
the RNG states, whatever the training loop adds (learning-rate schedule, lambda warm-up, data position,
losses so far), the byte length and sha256 of the safetensors file and, last, ``meta_sha256``: the sha256
of the sidecar's own content (`meta_digest`).

Both files are written atomically (`tritium.atomic`: temporary file, flush, fsync, rename, fsync of the
folder), the JSON sidecar last, so a checkpoint exists only once it is complete. `verify` checks both
hashes, the tensor file's length, and that the step agrees between the file names, the sidecar and the
tensor file's header, so a damaged or edited checkpoint is never loaded; `latest_valid` falls back to the
previous checkpoint, with a warning, when the newest fails, and a resumed run renames the ones it skipped
to ``damaged-ckpt-STEP.*`` (`set_aside`). Under torch.distributed every rank takes part in gathering
full state dicts (FSDP2 shards included) and only rank 0 writes; every rank reads the files on resume (the
folder must be visible to all of them). The ranks of a data-parallel run consume random numbers
identically, so rank 0's RNG states restore all.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import numpy as np
import torch
from torch import Tensor, nn

from .. import atomic
from . import distributed

FORMAT = 2
_NAME = re.compile(r"^ckpt-(\d+)\.json$")
#: Sidecar keys every checkpoint has (the training loop's own keys come on top).
REQUIRED = ("format", "step", "file", "bytes", "sha256", "param_groups", "optim_scalars", "rng", "meta_sha256")


def meta_digest(meta: dict) -> str:
    """The sha256 of a sidecar's content without its ``meta_sha256`` (canonical JSON: sorted keys)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _distinct(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors that share no storage (tied weights are copied), as safetensors needs."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Write ``tensors`` as one safetensors file atomically; return the bytes written."""
    from safetensors.torch import save

    data = save(_distinct(tensors), metadata=metadata)
    atomic.write_bytes(path, data)
    return data


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module, cpu_offload: bool = True) -> dict[str, Tensor]:
    """The full state dict of a plain, DDP or FSDP2 model (call on every rank; with ``cpu_offload``
    only rank 0 gets the tensors, the other ranks an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=cpu_offload))


def rng_state() -> tuple[dict[str, Tensor], dict]:
    """This process's RNG states: integer tensors plus a JSON-able remainder."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, state, py_gauss = random.getstate()
    tensors["rng/python"] = torch.tensor(state, dtype=torch.int64)
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(gauss)], "python": [version, py_gauss]}


def set_rng_state(tensors: dict[str, Tensor], meta: dict) -> None:
    """Restore the RNG states captured by `rng_state`."""
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_gauss = meta["python"]
    random.setstate((version, tuple(int(x) for x in tensors["rng/python"].tolist()), py_gauss))


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        return value.item()
    return value


def collect(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Tensor], dict]:
    """Tensors and JSON metadata of a full checkpoint (call on every rank; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors = {f"model/{k}": v for k, v in full_model_state(model).items()}
    meta: dict = {"param_groups": [], "optim_scalars": {}}
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
        for name, state in osd.get("state", {}).items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim/{name}/{key}"] = value
                else:
                    meta["optim_scalars"].setdefault(name, {})[key] = _jsonable(value)
        meta["param_groups"] = _jsonable(osd.get("param_groups", []))
    rng, meta["rng"] = rng_state()
    tensors.update(rng)
    return tensors, meta


def path_of(directory: Path, step: int) -> Path:
    """The JSON sidecar path of the checkpoint of ``step``."""
    return Path(directory) / f"ckpt-{step:08d}.json"


def save(
    directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
    extra: dict | None = None, keep: int = 2,
) -> Path:
    """Write the checkpoint of ``step`` into ``directory`` and keep the newest ``keep`` (0: all).

    Call on every rank; rank 0 writes. ``extra`` (JSON-able) is stored in the sidecar. Returns the
    sidecar path.
    """
    directory = Path(directory)
    tensors, meta = collect(model, optimizer)
    sidecar = path_of(directory, step)
    if distributed.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        st = sidecar.with_suffix(".safetensors")
        data = save_tensors(st, tensors, {"format": str(FORMAT), "step": str(step)})
        meta.update({"format": FORMAT, "step": step, "world_size": distributed.world_size(),
                     "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {}),
                     "file": st.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        meta = json.loads(json.dumps(meta))  # as it will read back (tuples become lists, keys strings)
        meta["meta_sha256"] = meta_digest(meta)
        atomic.write_text(sidecar, json.dumps(meta, indent=1))
        if keep:
            prune(directory, keep)
    distributed.barrier()
    return sidecar


def checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, sidecar)`` of every checkpoint sidecar in ``directory``, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and leftover temporary files."""
    for _, sidecar in checkpoints(directory)[keep:]:
        sidecar.unlink(missing_ok=True)
        sidecar.with_suffix(".safetensors").unlink(missing_ok=True)
    for tmp in Path(directory).glob(".ckpt-*.tmp"):
        tmp.unlink(missing_ok=True)


def _header_step(data: bytes) -> str | None:
    """The ``step`` entry of a safetensors file's metadata (None if absent or unreadable)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8: 8 + size])
        return header.get("__metadata__", {}).get("step")
    except (ValueError, AttributeError):
        return None


def set_aside(directory: Path, step: int) -> list[Path]:
    """Rename the checkpoints after ``step`` (those `latest_valid` skipped as damaged) to
    ``damaged-ckpt-STEP.*``, so that they are kept for inspection but neither loaded nor counted by `prune`
    (which would otherwise delete the new checkpoints of a resumed run first); returns the new sidecar paths."""
    moved = []
    for s, sidecar in checkpoints(directory):
        if s <= step:
            break
        for p in (sidecar, sidecar.with_suffix(".safetensors")):
            if p.exists():
                p.replace(p.with_name(f"damaged-{p.name}"))
        moved.append(sidecar.with_name(f"damaged-{sidecar.name}"))
    return moved


def verify(sidecar: Path) -> dict:
    """The metadata of a checkpoint after checking it in full; ValueError if it is damaged or edited.

    Checked: the sidecar parses, has every `REQUIRED` key and matches its own ``meta_sha256``; its format
    is `FORMAT`; its step is the one in its file name and in the tensor file's header; the tensor file is
    ``ckpt-STEP.safetensors`` beside it, with the recorded length and sha256."""
    sidecar = Path(sidecar)
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable metadata ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"metadata lacks {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise ValueError(f"format {meta['format']!r}, expected {FORMAT}")
    if meta["meta_sha256"] != meta_digest(meta):
        raise ValueError("metadata fails its sha256 check (edited or damaged)")
    m = _NAME.match(sidecar.name)
    if m is None or meta["step"] != int(m.group(1)):
        raise ValueError(f"step {meta['step']!r} does not match the file name {sidecar.name}")
    if meta["file"] != sidecar.with_suffix(".safetensors").name:
        raise ValueError(f"tensor file {meta['file']!r}, expected {sidecar.with_suffix('.safetensors').name}")
    st = sidecar.with_suffix(".safetensors")
    try:
        data = st.read_bytes()
    except OSError as e:
        raise ValueError(f"{st.name} is unreadable ({e.strerror})") from e
    if len(data) != meta["bytes"]:
        raise ValueError(f"{st.name} has {len(data)} bytes, expected {meta['bytes']}")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"{st.name} fails its sha256 check")
    if _header_step(data) != str(meta["step"]):
        raise ValueError(f"{st.name} holds step {_header_step(data)!r}, expected {meta['step']}")
    return meta


def latest_valid(directory: Path) -> Path | None:
    """The sidecar of the newest intact checkpoint in ``directory`` (None if there is none); damaged
    newer ones are skipped with a warning."""
    for _, sidecar in checkpoints(directory):
        try:
            verify(sidecar)
            return sidecar
        except ValueError as e:
            warnings.warn(f"checkpoint {sidecar} is damaged ({e}); falling back to the previous one",
                          RuntimeWarning, stacklevel=2)
    return None


def load(sidecar: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         restore_rng: bool = True) -> dict:
    """Load a checkpoint into ``model`` (plain, DDP or FSDP2) and ``optimizer``, restore the RNG states;
    return its metadata. Call on every rank."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    meta = verify(sidecar)
    tensors = load_file(Path(sidecar).with_name(meta["file"]))
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    set_model_state_dict(model, model_sd, options=_options())
    if optimizer is not None:
        state: dict[str, dict] = {name: dict(s) for name, s in meta["optim_scalars"].items()}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                name, key = k[len("optim/"):].rsplit("/", 1)
                state.setdefault(name, {})[key] = v
        groups = meta["param_groups"]
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=_options())
        for group in optimizer.param_groups:  # JSON has no tuples (AdamW's betas)
            group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})
    if restore_rng:
        set_rng_state(tensors, meta["rng"])
    return meta


class StopSignal:
    """Context manager that turns SIGTERM/SIGINT into a flag (``signum``) for the training loop to act
    on at the next step boundary; the previous handlers come back on exit. Does nothing unless
    ``enabled``."""

    def __init__(self, enabled: bool = True, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals if enabled else ()
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __enter__(self) -> StopSignal:
        try:
            self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


@dataclass
class Checkpointer:
    """Where and how often a training loop checkpoints: every ``every`` steps (0: only when stopped by a
    signal), keeping ``keep`` checkpoints; ``resume`` continues from the newest intact one."""

    directory: Path
    every: int = 0
    keep: int = 2
    resume: bool = False

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> Path:
        return save(self.directory, step, model, optimizer, extra, self.keep)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Metadata of the checkpoint loaded (None: start from scratch).

        Without ``resume``, existing checkpoints are an error rather than silently overwritten."""
        found = checkpoints(self.directory)
        if not self.resume:
            if found:
                raise FileExistsError(f"{self.directory} holds checkpoints of this run; pass --resume to "
                                      f"continue from them or delete the folder to start over")
            return None
        sidecar = latest_valid(self.directory)
        distributed.barrier()  # every rank has chosen before damaged files are moved
        if distributed.is_main():
            set_aside(self.directory, -1 if sidecar is None else int(_NAME.match(sidecar.name).group(1)))
        if sidecar is None:
            return None
        meta = load(sidecar, model, optimizer)
        if distributed.is_main():
            print(f"resumed from {sidecar} (step {meta['step']})", flush=True)
        return meta
