"""The built-in demo: a procedural shapes dataset and a model-free prompt-adherence scorer.

- :mod:`bitdance_rt.demo.shapes`: ``sample(index, size)`` -> (image, caption, attributes),
  ``heldout(n)`` evaluation prompts, ``vocabulary()``.
- :mod:`bitdance_rt.demo.detect`: ``parse_caption``, ``detect``, ``check``, ``score``.
- ``weights/``: the trained demo checkpoint (released layout plus ``bitdance_rt.json``).
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
