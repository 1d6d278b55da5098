"""`python -m nanochat_jax.cli STAGE [flags]`: the `nanochat-jax` console script without installing it."""

import sys

from nanochat_jax.cli import main

sys.exit(main())
