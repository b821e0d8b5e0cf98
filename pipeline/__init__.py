"""The offline pipeline: the only part of saescope that imports torch."""

import os

# torch's OpenMP runtime (libgomp) keeps an idle worker spinning for 300,000 iterations (some
# milliseconds) after each parallel region; on a machine with few cores that worker takes a core
# from the compiled kernels that follow the model's forward pass. A shorter spin still bridges
# the gaps between torch's own operations. libgomp reads this once, as torch loads; a value set
# in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
