"""``python -m tracker`` is the ``tracker`` console script."""

import sys

from .cli import main

sys.exit(main())
