"""bitdance-rt: deployment toolkit for the BitDance text-to-image model."""

import os

__version__ = "0.1.0"

# Reproducible CPU matrix products. By default oneMKL picks its float32 GEMM kernels and its
# split of the reduction between threads by the number of rows, so the same row rounds
# differently when it is computed alone, with the other guidance branch, with every sampler
# step's rows or with another request's: a backend that batches differently from the reference
# would draw another image for the same seed. MKL's strict conditional numerical reproducibility
# keeps one summation order per row whatever the batch and the thread count (checked by
# tests/test_models.py; it costs a few percent on small products). It must be set before MKL's
# first product, so it is set here, on import; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# OpenMP threads that sleep between parallel regions instead of spinning. The AR loop runs
# thousands of small products; spinning threads then hold the cores between them, and when
# another process wants a core (a server's other work, a training job) every region waits for
# a descheduled spinner: on a 2-core machine with one core busy, the mid preset's torch
# backend took 143 s with spinning threads and 6.6 s without (bench/RESULTS.md). ONNX Runtime
# is configured the same way (allow_spinning 0). It takes effect only if bitdance_rt is
# imported before torch (the CLI, the benchmarks and the tests are).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
