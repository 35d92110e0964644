"""Build wiring only: the C layer is compiled by cffi from csrc/build.py."""

from setuptools import setup

setup(cffi_modules=["csrc/build.py:ffibuilder"])
