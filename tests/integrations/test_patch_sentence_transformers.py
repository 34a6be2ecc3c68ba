"""``patch_sentence_transformers``: sentence-transformers' MNRL classes and ``GISTEmbedLoss`` become
fastcontrast's, at every import spelling, and ``SentenceTransformerTrainer`` trains to the same losses step by
step (MNRL, MNRL inside ``MatryoshkaLoss``, GISTEmbed with a guide model).

The trainer runs end to end on the CPU with a tiny randomly initialised BERT and a WordLevel tokenizer trained
on a few sentences (tests/_tiny_models.py), saved to a temporary folder: no hub access (HF_HUB_OFFLINE=1, and
USE_HUB_KERNELS=0 so that transformers does not kernelize the model through the hub).
"""

from __future__ import annotations

import importlib
import logging
import warnings

import pytest
import torch
from _tiny_models import SENTENCES, save_tiny_bert

import fastcontrast
from fastcontrast.integrations import patch_sentence_transformers

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")

import sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking as mnrl_module  # noqa: E402
import sentence_transformers.sentence_transformer.losses.multiple_negatives_symmetric_ranking as symmetric  # noqa: E402

CACHED_MODULES = {  # where 6.2.0 defines each Cached* loss
    "CachedMultipleNegativesRankingLoss": f"{st_losses.__name__}.cached_multiple_negatives_ranking",
    "CachedMultipleNegativesSymmetricRankingLoss": f"{st_losses.__name__}.cached_multiple_negatives_symmetric_ranking",
    "CachedGISTEmbedLoss": f"{st_losses.__name__}.cached_gist_embed",
}

ORIGINAL = st_losses.MultipleNegativesRankingLoss
ORIGINAL_SYMMETRIC = st_losses.MultipleNegativesSymmetricRankingLoss
ORIGINAL_GIST = st_losses.GISTEmbedLoss
ORIGINAL_CACHED = (st_losses.CachedMultipleNegativesRankingLoss, st_losses.CachedMultipleNegativesSymmetricRankingLoss,
                   st_losses.CachedGISTEmbedLoss)


@pytest.fixture(autouse=True)
def sentence_transformers_restored():
    yield
    assert st_losses.MultipleNegativesRankingLoss is mnrl_module.MultipleNegativesRankingLoss is ORIGINAL, (
        "a test left sentence-transformers patched"
    )
    assert st_losses.MultipleNegativesSymmetricRankingLoss is ORIGINAL_SYMMETRIC
    assert st_losses.GISTEmbedLoss is ORIGINAL_GIST
    assert (st_losses.CachedMultipleNegativesRankingLoss, st_losses.CachedMultipleNegativesSymmetricRankingLoss,
            st_losses.CachedGISTEmbedLoss) == ORIGINAL_CACHED


def test_every_import_spelling_returns_fastcontrasts_class_while_patched():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # sentence_transformers.losses is deprecated in 6.x
        from sentence_transformers import losses as old_spelling
    with patch_sentence_transformers() as handle:
        assert st_losses.MultipleNegativesRankingLoss is fastcontrast.MultipleNegativesRankingLoss
        assert old_spelling.MultipleNegativesRankingLoss is fastcontrast.MultipleNegativesRankingLoss
        assert mnrl_module.MultipleNegativesRankingLoss is fastcontrast.MultipleNegativesRankingLoss
        assert symmetric.MultipleNegativesSymmetricRankingLoss is fastcontrast.MultipleNegativesSymmetricRankingLoss
        assert old_spelling.GISTEmbedLoss is st_losses.GISTEmbedLoss is fastcontrast.GISTEmbedLoss
        for name in ("CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss",
                     "CachedGISTEmbedLoss"):
            ours = getattr(fastcontrast, name)
            assert getattr(old_spelling, name) is getattr(st_losses, name) is ours, name
            assert getattr(importlib.import_module(CACHED_MODULES[name]), name) is ours, name
        # 6.2.0's symmetric module imported the base class by name: that binding is the drop-in's too.
        cached_symmetric = importlib.import_module(CACHED_MODULES["CachedMultipleNegativesSymmetricRankingLoss"])
        assert cached_symmetric.CachedMultipleNegativesRankingLoss is fastcontrast.CachedMultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        assert type(MultipleNegativesRankingLoss(None)) is fastcontrast.MultipleNegativesRankingLoss
        assert set(handle.patched) >= {
            "sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss",
            "sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking.MultipleNegativesRankingLoss",
            "sentence_transformers.sentence_transformer.losses.MultipleNegativesSymmetricRankingLoss",
        }
    assert old_spelling.MultipleNegativesRankingLoss is ORIGINAL


def test_undo_is_idempotent_and_options_reach_the_loss():
    handle = patch_sentence_transformers(backend="torch", chunk_bytes=4096)
    loss = st_losses.MultipleNegativesRankingLoss(None, scale=30.0, directions=("query_to_doc", "doc_to_query"))
    assert (type(loss).__name__, loss.backend, loss.chunk_bytes, loss.scale) == (
        "MultipleNegativesRankingLoss", "torch", 4096, 30.0)
    handle.undo()
    handle.undo()
    assert st_losses.MultipleNegativesRankingLoss is ORIGINAL


def test_bad_patch_options_fail_at_patch_time():
    with pytest.raises(ValueError, match="backend"):
        patch_sentence_transformers(backend="gpu")
    with pytest.raises(ValueError, match="chunk_bytes"):
        patch_sentence_transformers(chunk_bytes=-1)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, 32-wide BERT with random weights and a WordLevel tokenizer trained here, saved locally."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def train_losses(model_dir, tmp_path, make_loss, *, negatives, steps=10):
    """Per-step training losses of ``SentenceTransformerTrainer`` with ``make_loss(model)``, batch 4, on CPU."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    model = SentenceTransformer(model_dir, device="cpu")
    columns = {"anchor": SENTENCES, "positive": SENTENCES[1:] + SENTENCES[:1]}
    if negatives:
        columns["negative"] = SENTENCES[5:] + SENTENCES[:5]
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, logging_steps=1,
        learning_rate=5e-3, seed=7, use_cpu=True, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns),
                                         loss=make_loss(model, model_dir))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps, f"expected {steps} logged losses, got {trainer.state.log_history}"
    return losses, trainer.loss


def mnrl(model, model_dir):
    # Unchanged user code: the name is looked up in sentence-transformers' module at call time.
    return st_losses.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "doc_to_query"))


def matryoshka_mnrl(model, model_dir):
    return st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model), matryoshka_dims=[32, 16, 8])


def cached_mnrl(model, model_dir):
    # Mini-batches of 3 in batches of 4 (ragged), dropout on: the per-step losses agree only if the re-forward
    # replays each mini-batch's RNG state as 6.2.0's does.
    return st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)


def gist(model, model_dir):
    from sentence_transformers import SentenceTransformer

    # The guide is a frozen copy of the initial model: it rates some in-batch candidates above the positive.
    return st_losses.GISTEmbedLoss(model, SentenceTransformer(model_dir, device="cpu"), temperature=0.05)


def inner_loss(loss):
    """The loss MatryoshkaLoss wraps, or the loss itself (a Cached* loss's own ``.loss`` is its non-cached core)."""
    return loss.loss if isinstance(loss, st_losses.MatryoshkaLoss) else loss


@pytest.mark.parametrize("make_loss, negatives, steps", [(mnrl, False, 10), (matryoshka_mnrl, True, 10),
                                                         (gist, True, 10), (cached_mnrl, True, 4)],
                         ids=["mnrl-pairs", "matryoshka-mnrl-triplets", "gist-triplets", "cached-mnrl-triplets"])
def test_trainer_losses_per_step_are_the_same_patched_and_unpatched(tiny_model_dir, tmp_path, monkeypatch,
                                                                     make_loss, negatives, steps):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # transformers 5.x kernelizes models through the hub's `kernels` package by default (a download); and this
    # repository's own kernels/ folder is importable as `kernels` from its root, which transformers would take
    # for that package.
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    logging.disable(logging.WARNING)
    try:
        expected, original_loss = train_losses(tiny_model_dir, tmp_path / "original", make_loss, negatives=negatives,
                                               steps=steps)
        with patch_sentence_transformers(backend="torch"):
            got, patched_loss = train_losses(tiny_model_dir, tmp_path / "patched", make_loss, negatives=negatives,
                                             steps=steps)
    finally:
        logging.disable(logging.NOTSET)
    inner = inner_loss(patched_loss)
    drop_ins = (fastcontrast.MultipleNegativesRankingLoss, fastcontrast.GISTEmbedLoss,
                fastcontrast.CachedMultipleNegativesRankingLoss)
    assert isinstance(inner, drop_ins), type(inner)
    assert not isinstance(inner_loss(original_loss), drop_ins)
    assert len(set(expected)) > 1, f"the loss did not change during training: {expected}"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"per-step training losses, patched vs original: {m}\n"
                                             f"patched {got}\noriginal {expected}")
