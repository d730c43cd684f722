#!/usr/bin/env python3
"""Entry point: ``python render.py jobs/demo.yaml``. See README.md."""

import sys

from render.cli import main

if __name__ == "__main__":
    sys.exit(main())
