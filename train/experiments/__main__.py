"""`python -m train.experiments`: the command line of `train.experiments.cli`."""
import sys

from train.experiments.cli import main

sys.exit(main())
