"""``python -m tritium`` (also what ``torchrun -m tritium`` runs)."""

import sys

from .cli import main

sys.exit(main())
