"""``python -m lorag``: the same as the ``lorag`` command (also what ``torchrun -m lorag`` runs)."""

import sys

from lorag.cli import main

sys.exit(main())
