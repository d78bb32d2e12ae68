"""`python -m qwenbook_bridge.bench`: the decode benchmark (bench/decode.py)."""

import sys

from qwenbook_bridge.bench.decode import main

sys.exit(main())
