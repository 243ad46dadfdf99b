"""``python -m kwf.cli``: the ``kwf`` command without its console script."""

import sys

from kwf.cli import main

sys.exit(main())
