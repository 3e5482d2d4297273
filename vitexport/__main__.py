"""``python -m vitexport``: the same command as the ``vitexport`` script, for environments whose scripts folder is not
on PATH (a CI step calling the interpreter of a virtual environment directly)."""

import sys

from .cli import main

sys.exit(main())
