"""The public names and every import spelling users have, which the move to one module per loss family kept.

A name listed here is API: training code imports it by these paths, checkpoints pickle the modules by their
``__module__``, and the integrations patch the originals with these classes.
"""

from __future__ import annotations

import importlib
import pickle

import pytest

import fastcontrast

# name → (family module, every other path it is importable from)
MODULES = {
    "ClipLoss": "clip",
    "CoCaLoss": "clip",
    "DistillClipLoss": "distill",
    "SigLipLoss": "siglip",
    "NTXentLoss": "ntxent",
    "DCLLoss": "ntxent",
    "DCLWLoss": "ntxent",
    "SupConLoss": "supcon",
    "MultipleNegativesRankingLoss": "mnrl",
    "MultipleNegativesSymmetricRankingLoss": "mnrl",
    "GISTEmbedLoss": "gist",
    "CachedMultipleNegativesRankingLoss": "cached_mnrl",
    "CachedMultipleNegativesSymmetricRankingLoss": "cached_mnrl",
    "CachedGISTEmbedLoss": "cached_gist",
}
FUNCTIONS = {
    "clip_loss": "clip",
    "distill_clip_loss": "distill",
    "siglip_loss": "siglip",
    "nt_xent_loss": "ntxent",
    "nt_xent_memory_bank_loss": "ntxent",
    "dcl_loss": "ntxent",
    "negative_mises_fisher_weights": "ntxent",
    "supcon_loss": "supcon",
    "supcon_anchor_losses": "supcon",
    "supcon_anchor_losses_with_distance": "supcon",
    "multiple_negatives_ranking_loss": "mnrl",
    "gist_embed_loss": "gist",
}
CORE = ("BlockwiseDistill", "BlockwiseLogSumExp", "BlockwiseSigLipSum", "blockwise_distill", "blockwise_lse",
        "blockwise_lse_and_positives", "blockwise_siglip_sum")


def resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_top_level_exports_exactly_the_documented_names():
    expected = set(MODULES) | set(FUNCTIONS) - {"supcon_anchor_losses", "supcon_anchor_losses_with_distance"}
    expected |= set(CORE) | {"__version__", "GradCache", "PartialGradientError"}
    assert set(fastcontrast.__all__) == expected
    for name in fastcontrast.__all__:
        assert hasattr(fastcontrast, name), f"fastcontrast.{name} is listed in __all__ but missing"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_class_is_one_object_under_every_import_path(name):
    paths = [f"fastcontrast.{name}", f"fastcontrast.losses.{name}", f"fastcontrast.losses.{MODULES[name]}.{name}"]
    objects = {path: resolve(path) for path in paths}
    assert len({id(o) for o in objects.values()}) == 1, f"{name} differs between {paths}"
    assert name in fastcontrast.losses.__all__


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_classes_pickle_by_the_public_path_they_had_before_the_split(name):
    cls = getattr(fastcontrast, name)
    assert (cls.__module__, cls.__qualname__) == ("fastcontrast.losses", name)
    kwargs = {"CoCaLoss": {"caption_loss_weight": 2.0, "clip_loss_weight": 1.0},
              "MultipleNegativesRankingLoss": {"model": None}, "MultipleNegativesSymmetricRankingLoss": {"model": None},
              "GISTEmbedLoss": {"model": None, "guide": None}, "CachedMultipleNegativesRankingLoss": {"model": None},
              "CachedMultipleNegativesSymmetricRankingLoss": {"model": None},
              "CachedGISTEmbedLoss": {"model": None, "guide": None}}.get(name, {})
    restored = pickle.loads(pickle.dumps(cls(**kwargs)))
    assert type(restored) is cls


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_each_function_is_one_object_under_every_import_path(name):
    paths = [f"fastcontrast.functional.{name}", f"fastcontrast.losses.{FUNCTIONS[name]}.{name}"]
    if name in fastcontrast.__all__:
        paths.append(f"fastcontrast.{name}")
    assert len({id(resolve(p)) for p in paths}) == 1, f"{name} differs between {paths}"
    assert name in fastcontrast.functional.__all__


@pytest.mark.parametrize("name", CORE)
def test_the_differentiable_core_is_public_at_the_top_and_in_autograd(name):
    assert resolve(f"fastcontrast.{name}") is resolve(f"fastcontrast.autograd.{name}")


def test_helpers_users_import_keep_their_paths():
    from fastcontrast.functional import normalize_rows
    from fastcontrast.memory_bank import MemoryBank

    assert normalize_rows is resolve("fastcontrast.losses._common.normalize_rows")
    assert MemoryBank is resolve("fastcontrast.losses.ntxent.MemoryBank")


def test_the_integrations_patch_in_the_public_classes():
    import fastcontrast.integrations as integrations

    for name in ("patch_open_clip", "patch_lightly", "patch_pytorch_metric_learning"):
        assert callable(getattr(integrations, name)), f"fastcontrast.integrations.{name}"


def test_the_cached_step_is_public_at_the_top_and_in_its_module():
    assert resolve("fastcontrast.GradCache") is resolve("fastcontrast.cached.GradCache")
    assert resolve("fastcontrast.PartialGradientError") is resolve("fastcontrast.cached.PartialGradientError")


def test_the_reference_imports_nothing_it_checks():
    # The ground truth must not share code with what it checks: it imports torch and its own modules only.
    import ast
    import pathlib

    import fastcontrast.reference

    folder = pathlib.Path(fastcontrast.reference.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                assert not module.startswith("fastcontrast") or module.startswith("fastcontrast.reference"), (
                    f"{path.name} imports {module}")
