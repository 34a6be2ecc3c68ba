"""Integration tests against the real open_clip, lightly and pytorch-metric-learning packages.

CI installs them with ``pip install --no-deps -r tests/integrations/requirements.txt`` (see the Makefile);
a test skips only where its package is absent. Importing ``integration_support`` here puts the test-only
torchvision stub on ``sys.path`` when no real torchvision imports, before the test modules import open_clip.
"""

import sys
from pathlib import Path

# The test modules import integration_support by name; pytest's default "prepend" import mode puts this
# folder on sys.path anyway, but other import modes do not.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

import integration_support  # noqa: E402, F401
