"""`python -m trainer` runs the `trainer` console script."""

from __future__ import annotations

import sys

from trainer.cli import main

sys.exit(main())
