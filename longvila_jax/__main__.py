"""``python -m longvila_jax``: the tiny end-to-end demo (see ``longvila_jax.demo``)."""

import sys

from longvila_jax.demo import main

if __name__ == "__main__":
    sys.exit(main())
