"""The ``acl`` module (pyACL API) that ``flexnpu run`` puts on the program's path.

All logic lives in flexnpu.hook.acl; this file only makes it importable as ``acl``.
"""

import sys as _sys

from flexnpu.hook.acl import populate as _populate

_populate(_sys.modules[__name__])
