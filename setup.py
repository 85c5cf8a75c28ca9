"""Build of the kernel library: plain C with a C ABI, loaded with ctypes (no PyTorch or CPython ABI).

The extension is optional: without a C compiler the package installs and falls back to the
pure-PyTorch reference kernels with a warning. It is built with OpenMP (so that it shares the libgomp
runtime that torch ships); a compiler without OpenMP gets a single-threaded build.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = "-fopenmp"


class BuildExt(build_ext):
    """Builds with OpenMP, and again without it when the compiler lacks OpenMP."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # CompileError / LinkError: the compiler has no OpenMP
            if OPENMP not in ext.extra_compile_args:
                raise
            print(f"warning: building {ext.name} without OpenMP (single-threaded kernels): {e}")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != OPENMP]
            super().build_extension(ext)


kernels = Extension(
    "tritium.kernels._tritium_kernels",
    sources=["src/tritium/kernels/csrc/ternary.c", "src/tritium/kernels/csrc/adamw.c"],
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden",
                        "-pthread", OPENMP],
    extra_link_args=["-pthread", OPENMP],
    optional=True,
)

setup(ext_modules=[kernels], cmdclass={"build_ext": BuildExt})
