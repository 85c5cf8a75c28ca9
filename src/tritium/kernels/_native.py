"""Loading of the compiled kernel library (plain C ABI, via ctypes)."""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

NAME = "_tritium_kernels"
NATIVE_IDS = {"generic": 0, "avx2": 1, "avx512": 2, "amx": 3, "neon": 4}
ABI_VERSION = 7


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    found = [here / (NAME + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    found = [p for p in found if p.is_file()]
    return found + [p for p in sorted(here.glob(NAME + "*.so")) if p not in found]


def load() -> tuple[ctypes.CDLL | None, str]:
    """The library and an empty string, or None and why it could not be loaded.

    ``TRITIUM_KERNEL_LIB`` names the library file explicitly (default: next to this module).
    """
    explicit = os.environ.get("TRITIUM_KERNEL_LIB")
    paths = [Path(explicit)] if explicit else _candidates()
    if not paths:
        return None, f"no compiled {NAME} library next to {Path(__file__).parent} (build with pip install -e .)"
    try:
        lib = ctypes.CDLL(str(paths[0]))
        lib.tk_supported.restype = ctypes.c_int
        lib.tk_abi_version.restype = ctypes.c_int
        lib.tk_openmp_runtime.restype = ctypes.c_char_p
        if lib.tk_abi_version() != ABI_VERSION:
            return None, f"{paths[0]} has ABI version {lib.tk_abi_version()}, expected {ABI_VERSION} (rebuild it)"
        fns = (lib.tk_ternary_matmul, lib.tk_quantize_rows, lib.tk_ternary_linear, lib.tk_test_fail_task_allocs,
               lib.tk_lazy_adamw, lib.tk_pack, lib.tk_quantize_ternary)
    except (OSError, AttributeError) as e:
        return None, f"cannot load {paths[0]}: {e}"
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    argtypes = (
        [i32, p, p, p, p, i32, p, p, i64, i64, i64, i32],  # tk_ternary_matmul
        [i32, p, p, p, i64, i64, i32],  # tk_quantize_rows
        [i32, p, p, p, i32, p, p, i64, i64, i64, i32],  # tk_ternary_linear
        [i32],  # tk_test_fail_task_allocs
        [p, p, p, p, i64, i64, p, i64, p, i64, p, p, p, f32, f32, f32, f32, f32, i32],  # tk_lazy_adamw
        [i32, p, p, i64, i64, i32],  # tk_pack
        [i32, p, p, i32, p, p, p, i64, i64, i32],  # tk_quantize_ternary
    )
    for fn, args in zip(fns, argtypes, strict=True):
        fn.restype = ctypes.c_int
        fn.argtypes = args
    lib.tk_test_fail_task_allocs.restype = None
    return lib, ""


def supported(lib: ctypes.CDLL) -> list[str]:
    """Names of the native backends the library can run on this CPU, fastest first."""
    mask = lib.tk_supported()
    return [name for name, i in sorted(NATIVE_IDS.items(), key=lambda kv: -kv[1]) if mask >> i & 1]


OP_SOURCE = Path(__file__).resolve().parent / "csrc" / "op.cpp"


def build_op() -> str:
    """Build (once per torch version and source; cached by ``torch.utils.cpp_extension``) and load the C++ custom
    op ``torch.ops.tritium.ternary_linears_native`` (csrc/op.cpp); an empty string, or why it could not be built.

    It needs a C++ compiler and ``ninja``, as ``torch.compile`` on a CPU needs a compiler; the directory is
    ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).
    """
    import hashlib
    import io
    from contextlib import redirect_stderr, redirect_stdout

    import torch
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    digest = hashlib.sha256(OP_SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    log = io.StringIO()
    try:
        with redirect_stdout(log), redirect_stderr(log):
            cpp_extension.load(f"tritium_op_{digest}", [str(OP_SOURCE)], extra_cflags=["-O2"],
                               is_python_module=False)
    except Exception as e:  # a compiler error, or no compiler at all
        return f"building {OP_SOURCE.name} failed: {' '.join(f'{type(e).__name__}: {e}'.split())[:400]}"
    return ""
