"""`python -m streambars` is the same as the `streambars` command."""

import sys

from .startup import interrupt_on_stop_signals

interrupt_on_stop_signals()  # before the heavy imports: a stop while importing exits 130 too

try:
    from .cli import console_main
except KeyboardInterrupt:
    print("streambars: interrupted while starting; nothing was done", file=sys.stderr)
    sys.exit(130)

console_main()
