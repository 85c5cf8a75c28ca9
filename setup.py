"""Build of the kernel library: plain C with a C ABI, loaded with ctypes (no PyTorch or CPython ABI).

The extension is optional: without a C compiler the package installs and falls back to the
pure-PyTorch reference kernels with a warning.
"""

from setuptools import Extension, setup

kernels = Extension(
    "tritium.kernels._tritium_kernels",
    sources=["src/tritium/kernels/csrc/ternary.c"],
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fvisibility=hidden", "-pthread"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[kernels])
