"""`python -m cca_jax.convert`: the command line of `cca_jax.convert.cli`."""
import sys

from cca_jax.convert.cli import main

sys.exit(main())
