"""Build hook for the one compiled part: sessions/_fastscan.c (see sessions/fastscan.py). Metadata is in pyproject.toml.

The extension is optional: without a C compiler (or Python's headers) the build warns and medbroker installs without
it; the deep scanner then runs the same checks in pure Python (same verdicts, slower). scripts/install.sh installs
a compiler where it can, and tests/test_fastscan.py fails when one is present but the extension did not build.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sessions._fastscan", ["sessions/_fastscan.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])])
