"""``python -m opera_jax``: the ``opera-jax`` command."""

import sys

from opera_jax.cli import entry

sys.exit(entry())
