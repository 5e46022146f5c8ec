"""`python -m train.attention_reach`: the command line of `train.attention_reach.cli`."""
import sys

from train.attention_reach.cli import main

sys.exit(main())
