"""`python -m loramux serve ...` is `loramux serve ...`."""
import sys

from loramux.server.cli import main

sys.exit(main())
