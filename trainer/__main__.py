"""`python -m trainer ...` == `loramux train ...`."""
import sys

from loramux.trainer.cli import main

sys.exit(main())
