"""`python -m pretrainx` entry point."""

import sys

from pretrainx.cli import main

if __name__ == "__main__":
  sys.exit(main())
