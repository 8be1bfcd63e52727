"""``python -m cadiff <job> ...``: the same as the ``cadiff`` command."""

import sys

from cadiff.cli import main

sys.exit(main())
