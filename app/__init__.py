"""The MedServe inference service (FastAPI): routes, runners, the batching engine and their settings."""

import os

# OpenMP worker threads (PyTorch's intra-op pool) spin while they wait for work by default. In a server the
# event loop and the decode threads share the cores with them, and spinning threads starve those (measured on
# a loaded 2-core machine: a forward pass about 20x slower). libgomp reads this when torch is imported, so it is set
# here, before any app module imports torch; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
