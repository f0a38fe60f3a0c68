"""bitdance-rt: deployment toolkit for the BitDance text-to-image model."""

import os

__version__ = "0.1.0"

# Reproducible CPU matrix products. oneMKL picks its float32 GEMM kernel and its split of the
# work between threads from the shape and the thread count; its strict conditional numerical
# reproducibility fixes the summation order for a given shape whatever the number of threads.
# It does not make a row independent of the number of rows computed with it (oneMKL computes 1
# to 3 rows with another kernel, in strict mode too): bitdance_rt.models.linear does that by
# computing every product in tiles of one shape (tests/test_library.py checks both). It must be
# set before MKL's first product, so it is set here, on import; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# OpenMP threads that sleep between parallel regions instead of spinning. The AR loop runs
# thousands of small products; spinning threads then hold the cores between them, and when
# another process wants a core (a server's other work, a training job) every region waits for
# a descheduled spinner: on a 2-core machine with one core busy, the mid preset's torch
# backend took 150.7 s with spinning threads and 6.79 s without (bench/RESULTS.md). ONNX Runtime
# is configured the same way (allow_spinning 0). It takes effect only if bitdance_rt is
# imported before torch (the CLI, the benchmarks and the tests are).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
