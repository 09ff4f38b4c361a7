"""`python -m streambars` is the same as the `streambars` command."""

import sys

from .cli import main

sys.exit(main())
