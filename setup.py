"""Build of the C++ kernel library (plain C ABI, loaded with ctypes; no PyTorch or CPython ABI)."""

from setuptools import setup

setup()
