"""`python -m sage_fast ...` is the `sage-fast` command (torchrun: `torchrun ... -m sage_fast train ...`)."""
import sys

from .cli import main

sys.exit(main())
