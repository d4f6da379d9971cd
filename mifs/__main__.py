"""`python -m mifs` is the `mifs` command."""

import sys

from mifs.cli import main

sys.exit(main())
