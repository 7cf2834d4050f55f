"""``python -m masked_dit`` = the ``masked-dit`` command."""
import sys

from masked_dit.cli import main

sys.exit(main())
