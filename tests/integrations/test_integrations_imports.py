"""Importing the integrations costs nothing, and a missing library gives an ImportError that says what to install.

Run in a fresh interpreter: this test session has the libraries imported already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from integration_support import subprocess_env

PROBE = textwrap.dedent(
    """
    import json, sys
    import fastcontrast.integrations, fastcontrast.open_clip_train
    fastcontrast.MultipleNegativesRankingLoss(None)  # its default similarity is fastcontrast's own cos_sim
    libraries = ("open_clip", "open_clip_train", "lightly", "pytorch_metric_learning", "torchvision",
                 "sentence_transformers", "transformers")
    result = {"imported": sorted(m for m in libraries if m in sys.modules)}

    # The library itself missing (None in sys.modules makes its import fail as if it were not installed).
    for module, patch in [("open_clip", "patch_open_clip"), ("lightly", "patch_lightly"),
                          ("pytorch_metric_learning", "patch_pytorch_metric_learning"),
                          ("sentence_transformers", "patch_sentence_transformers")]:
        sys.modules[module] = None
        try:
            getattr(fastcontrast.integrations, patch)()
        except ImportError as exc:
            result[patch] = str(exc)
        del sys.modules[module]

    # The library present but one of its own dependencies missing.
    sys.modules["torchvision"] = None
    try:
        fastcontrast.integrations.patch_open_clip()
    except ImportError as exc:
        result["broken dependency"] = str(exc)
    print(json.dumps(result))
    """
)


def test_importing_integrations_imports_no_library_and_missing_ones_name_their_pip_package():
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                           env=subprocess_env())
    assert probe.returncode == 0, probe.stderr[-4000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    assert "pip install open_clip_torch" in result["patch_open_clip"]
    assert "pip install lightly" in result["patch_lightly"]
    assert "pip install pytorch-metric-learning" in result["patch_pytorch_metric_learning"]
    assert "pip install sentence-transformers" in result["patch_sentence_transformers"]
    assert "installed but does not import" in result["broken dependency"]
    assert "torchvision" in result["broken dependency"]
