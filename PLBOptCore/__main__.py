"""``python -m PLBOptCore`` — the same CLI as ``plbopt``."""

import sys

from .cli import main

sys.exit(main())
