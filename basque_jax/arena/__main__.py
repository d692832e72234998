"""``python -m basque_jax.arena serve|ratings|export ...`` (same as ``basque-jax arena``)."""

import sys

from basque_jax.arena.cli import main

sys.exit(main())
