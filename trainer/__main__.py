"""`python -m trainer ...` == `loramux train ...`."""
import sys

from trainer.cli import main

sys.exit(main())
