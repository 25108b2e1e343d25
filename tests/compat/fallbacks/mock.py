"""``import mock`` for Horovod's test/utils/common.py where the ``mock`` backport is not installed.

The runner appends this folder to the end of the path, so an installed ``mock`` wins.
"""

from unittest.mock import *  # noqa: F403
