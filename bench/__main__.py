"""Entry point of `python -m bench`.

Must not do anything but hand over to bench.cli.
"""

import sys

from bench.cli import main

sys.exit(main())
