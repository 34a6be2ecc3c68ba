"""Integration tests against the real open_clip, lightly and pytorch-metric-learning packages.

CI installs them with ``pip install --no-deps -r tests/integrations/requirements.txt`` (see the Makefile);
a test skips only where its package is absent. Importing ``integration_support`` here puts the test-only
torchvision stub on ``sys.path`` when no real torchvision imports, before the test modules import open_clip.
"""

import integration_support  # noqa: F401
