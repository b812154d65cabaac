"""The compiled decoding loops (``hf_epr/format/_native.c``) are optional: without a C compiler the build goes on
and hf_epr decodes with constriction and NumPy (the same values, several times slower)."""

import os

from setuptools import Extension, setup

setup(ext_modules=[Extension("hf_epr.format._native", ["hf_epr/format/_native.c"], optional=True,
                             extra_compile_args=[] if os.name == "nt" else ["-O3", "-ffp-contract=off"])])
