import sys

from flexnpu.cli import main

sys.exit(main())
