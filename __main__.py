"""``python -m quantscope`` runs the same entry point as the ``quantscope`` script."""

import sys

from quantscope.app.cli import main

sys.exit(main())
