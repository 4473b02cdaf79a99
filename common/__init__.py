"""The pure core of dpfedseg: configuration, data, sites, model, metrics and privacy.

Nothing here imports Flower types, ``client``, ``server`` or ``simulations``.
"""

import os

# Intel MKL (torch's BLAS on x86) picks code paths by the memory alignment of each call's
# buffers, so 4 of 9 repeats of one seeded site round on an Intel Xeon differed in the
# last bits. Conditional numerical reproducibility fixes the path. MKL reads the variable
# at its first call, so it is set on import, before any training. A user's value is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
