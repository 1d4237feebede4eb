"""Build the daemon's compiled plan executor (make install runs this):

    python3 -m flexnpu.daemon.optable.build            # build (idempotent)
    python3 -m flexnpu.daemon.optable.build --force    # rebuild

What it is and when the daemon uses it: flexnpu/daemon/compiled.py.
"""

import sys

from ..compiled import main

if __name__ == "__main__":
    sys.exit(main())
