"""``python -m fakes``: the offline fake vendors (``--help`` for the options)."""

import sys

from fakes.server import main

sys.exit(main())
