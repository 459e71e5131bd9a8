"""``python -m kongtask`` runs the command-line interface."""

import sys

from kongtask.ops.cli.main import main

sys.exit(main())
