"""`python -m benchmarks ...` is `python -m benchmarks.bench ...` (the goodput bench)."""

import sys

from benchmarks.bench import main

sys.exit(main())
