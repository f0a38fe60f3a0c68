"""Every default and limit a user meets, in one place: the CLI's options (typer), the server's
flags and request body, the request checks and the memory planner read them from here.

A model's own defaults (size, steps, guidance) live with the model (``spec.Defaults``, or a
checkpoint's ``bitdance_rt.json``); these are the toolkit's.
"""

from __future__ import annotations

# A request
DEFAULT_SEED = 42
MAX_SEED = 2**63 - 1
MAX_IMAGES = 64          # images in one request (and in one AR run)
MAX_STEPS = 1000         # head sampling steps
MIN_GUIDANCE = 1.0       # 1.0: no guidance
MAX_GUIDANCE = 100.0

# A server (`bitdance-rt serve`)
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8000
SERVE_MAX_BATCH = 8      # images in one AR run
SERVE_MAX_QUEUE = 64     # requests waiting (not running); more get 429
SERVE_TIMEOUT_S = 600.0  # seconds from arrival to the response; then 504
SERVE_MAX_BODY = 1 << 20         # bytes of a request body, counted as they arrive; more: 413
SERVE_CLIENT_TIMEOUT_S = 30.0    # seconds for a request's head, for its body, and for the client
                                 # to take each piece of an answer; then 408 and closed
# SIGTERM's drain lasts at most --drain-timeout seconds, by default the --timeout (every request
# received is answered or timed out by then); then what is left is dropped
