"""`python -m edgeagent` is the same as the `edgeagent` console script."""

import sys

from edgeagent.cli import main

sys.exit(main())
