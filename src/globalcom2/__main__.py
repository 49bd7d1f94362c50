"""`python -m globalcom2` runs the command line."""

import sys

from globalcom2.cli import main

sys.exit(main())
