"""The compiled loops are optional: without a C compiler the build goes on, hf_epr decodes with constriction and
NumPy (``hf_epr/format/_native.c``: the same values, several times slower) and trains with torch operations alone
(``hf_epr/_native_train.c``: the same values, a slower step on the CPU)."""

import os

from setuptools import Extension, setup

POSIX = os.name != "nt"
# float32 rounded exactly as torch rounds it (no fused multiply-add); no trapping math, so that selects vectorize
FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math"] if POSIX else []
setup(ext_modules=[Extension("hf_epr.format._native", ["hf_epr/format/_native.c"], optional=True,
                             extra_compile_args=FLAGS),
                   Extension("hf_epr._native_train", ["hf_epr/_native_train.c"], optional=True,
                             extra_compile_args=FLAGS + (["-pthread"] if POSIX else []),
                             extra_link_args=["-pthread"] if POSIX else [])])
