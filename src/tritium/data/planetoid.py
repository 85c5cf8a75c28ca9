"""Planetoid citation graphs (Cora, CiteSeer, PubMed) with their public split, read from local files.

The raw files are expected under ``<data root>/planetoid/<Name>/raw/`` as published in the planetoid
repository. They are linked into a writable cache folder, where PyTorch Geometric writes its processed
files, so the data root may be read-only; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from . import DataNotFoundError, cache_dir, data_root

NAMES = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
SUFFIXES = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
SOURCE = "https://github.com/kimiyoung/planetoid (data/ind.<name>.*)"


def raw_files(root: Path, name: str) -> list[Path]:
    """The raw files dataset ``name`` needs under data root ``root``."""
    return [Path(root) / "planetoid" / name / "raw" / f"ind.{name.lower()}.{s}" for s in SUFFIXES]


def load_planetoid(name: str, root: str | Path | None = None, normalize_features: bool = True):
    """The PyG ``Data`` of Planetoid dataset ``name`` with its public train/val/test masks.

    Raises `DataNotFoundError` naming the missing raw files instead of downloading them.
    """
    from torch_geometric.datasets import Planetoid
    from torch_geometric.transforms import NormalizeFeatures

    if name.lower() not in NAMES:
        raise ValueError(f"unknown Planetoid dataset {name!r}; choose one of {sorted(NAMES.values())}")
    name = NAMES[name.lower()]
    files = raw_files(data_root(root), name)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"Planetoid {name} not found: missing {', '.join(missing)}. Put the raw files there "
            f"(published at {SOURCE}) or pass --data-dir / set TRITIUM_DATA."
        )
    cache = cache_dir("planetoid")
    raw = cache / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for src in files:
        dst = raw / src.name
        if dst.is_symlink() and dst.resolve() != src.resolve():
            dst.unlink()
        if not dst.exists():
            dst.symlink_to(src.resolve())
    transform = NormalizeFeatures() if normalize_features else None
    return Planetoid(str(cache), name, split="public", transform=transform)[0]
