"""`python -m train.evaluate`: the command line of `train.evaluate.cli`."""
import sys

from train.evaluate.cli import main

sys.exit(main())
