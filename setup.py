"""The optional C hot path of the Link (vramancer/link/_fastlink.c). Everything else is in pyproject.toml.
optional=True: where no compiler is available the install still succeeds and the Link runs in Python."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("vramancer.link._fastlink", ["vramancer/link/_fastlink.c"], optional=True,
                             extra_compile_args=["-O2"])])
