import sys

from rewrites.cli import main

sys.exit(main())
