"""``python -m basque_jax.serve MODEL [MODEL ...]`` (same as ``basque-jax serve``)."""

import sys

from basque_jax.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
