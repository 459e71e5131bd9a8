"""``python -m kongtask`` runs the command-line interface."""

import sys

from kongtask.ops.cli.main import main

# Guarded: a process-pool child (spawn) imports the main module again, as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())
