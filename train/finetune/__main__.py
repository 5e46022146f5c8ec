"""`python -m train.finetune`: the command line of `train.finetune.cli`."""
import sys

from train.finetune.cli import main

sys.exit(main())
