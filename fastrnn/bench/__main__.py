"""`python -m fastrnn.bench` is `fastrnn-bench`."""

import sys

from fastrnn.bench.cli import main

sys.exit(main())
