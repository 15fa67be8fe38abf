"""``python -m cskd`` (and ``torchrun -m cskd``) run the command line."""

import sys

from cskd.cli import main

sys.exit(main())
