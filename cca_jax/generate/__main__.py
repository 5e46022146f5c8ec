"""`python -m cca_jax.generate`: the command line of `cca_jax.generate.cli`."""
import sys

from cca_jax.generate.cli import main

sys.exit(main())
