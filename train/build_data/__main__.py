"""`python -m train.build_data`: the command line of `train.build_data.cli`."""
import sys

from train.build_data.cli import main

sys.exit(main())
