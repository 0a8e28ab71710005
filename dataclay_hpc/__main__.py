"""``python -m dataclay_hpc`` is the ``dataclay-hpc`` command."""

import sys

from .cli import main

sys.exit(main())
