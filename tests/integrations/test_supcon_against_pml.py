"""fastcontrast's ``SupConLoss`` against the real pytorch-metric-learning 2.x ``SupConLoss``.

PML's base-class keywords (``distance=``, ``reducer=``, ``embedding_regularizer=``), a miner's
``indices_tuple`` (pairs and triplets, with and without labels, against a reference set) and
``CrossBatchMemory``, which always passes one: values and gradients to fp64 rounding.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastcontrast

pml = pytest.importorskip("pytorch_metric_learning")

from pytorch_metric_learning import distances, losses, miners, reducers, regularizers  # noqa: E402

TEMPERATURE = 0.2


def batch(n, d, classes, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def value_and_grads(loss_fn, tensors, *args, **kwargs):
    """The loss and the gradients of ``tensors`` (zeros where the loss does not depend on one)."""
    live = [t.clone().requires_grad_() for t in tensors]
    loss = loss_fn(live[0], *args, **kwargs) if len(live) == 1 else loss_fn(live[0], *args, ref_emb=live[1], **kwargs)
    grads = torch.autograd.grad(loss, live, allow_unused=True)
    return loss.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(live, grads)]


def assert_same(ours, theirs, *, rtol=1e-12, atol=1e-12):
    (loss, grads), (expected, expected_grads) = ours, theirs
    torch.testing.assert_close(loss.to(expected.dtype), expected, rtol=rtol, atol=atol)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol)


def both(**kwargs):
    """(fastcontrast's, PML's) SupConLoss with the same keywords; fastcontrast's on the torch engine."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the non-blockwise-distance warning
        ours = fastcontrast.SupConLoss(temperature=TEMPERATURE, backend="torch", **kwargs)
    return ours, losses.SupConLoss(temperature=TEMPERATURE, **kwargs)


MINERS = {
    "multi-similarity (pairs)": miners.MultiSimilarityMiner,
    "pair-margin (pairs)": miners.PairMarginMiner,
    "triplet-margin (triplets)": lambda: miners.TripletMarginMiner(margin=0.5),
    "batch-hard (triplets)": miners.BatchHardMiner,
    "batch-easy-hard (pairs)": miners.BatchEasyHardMiner,
}


@pytest.mark.parametrize("miner", list(MINERS), ids=list(MINERS))
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
def test_a_miners_indices_tuple_gives_pmls_loss(miner, with_labels):
    embeddings, labels = batch(40, 16, 4, seed=1)
    indices_tuple = MINERS[miner]()(embeddings, labels)
    ours, theirs = both()
    given = labels if with_labels else None
    assert_same(value_and_grads(ours, [embeddings], given, indices_tuple),
                value_and_grads(theirs, [embeddings], given, indices_tuple))


def test_a_miners_indices_tuple_against_a_reference_set_gives_pmls_loss():
    embeddings, labels = batch(24, 12, 3, seed=2)
    ref_emb, ref_labels = batch(31, 12, 3, seed=3)
    indices_tuple = miners.MultiSimilarityMiner()(embeddings, labels, ref_emb, ref_labels)
    ours, theirs = both()
    assert_same(value_and_grads(ours, [embeddings, ref_emb], labels, indices_tuple, ref_labels=ref_labels),
                value_and_grads(theirs, [embeddings, ref_emb], labels, indices_tuple, ref_labels=ref_labels))


def test_duplicated_mined_pairs_count_once_as_in_pmls_masks():
    embeddings, labels = batch(20, 8, 3, seed=4)
    a1, p, a2, n = miners.MultiSimilarityMiner()(embeddings, labels)
    doubled = (torch.cat([a1, a1]), torch.cat([p, p]), torch.cat([a2, a2]), torch.cat([n, n]))
    ours, theirs = both()
    assert_same(value_and_grads(ours, [embeddings], labels, doubled),
                value_and_grads(theirs, [embeddings], labels, doubled))


@pytest.mark.parametrize("pairs", [
    (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2])),  # one of each: zero loss
    (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([], dtype=torch.long),
     torch.tensor([], dtype=torch.long)),  # no negative pair: zero loss
    (torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([0, 3, 3]), torch.tensor([4, 5, 1])),
], ids=["one-pair-each", "no-negatives", "few-pairs"])
def test_pmls_early_exits_on_few_mined_pairs(pairs):
    embeddings, labels = batch(6, 5, 2, seed=5)
    ours, theirs = both()
    assert_same(value_and_grads(ours, [embeddings], labels, pairs),
                value_and_grads(theirs, [embeddings], labels, pairs))


def test_cross_batch_memory_which_always_passes_an_indices_tuple_gives_pmls_loss():
    torch.manual_seed(0)
    ours, theirs = both()
    memories = [losses.CrossBatchMemory(loss, embedding_size=8, memory_size=32) for loss in (ours, theirs)]
    for step in range(4):
        embeddings, labels = batch(12, 8, 5, seed=10 + step)
        results = [value_and_grads(memory, [embeddings], labels) for memory in memories]
        assert_same(*results)


DISTANCES = {
    "cosine": distances.CosineSimilarity,
    "dot-product": distances.DotProductSimilarity,
    "dot-product-unnormalised": lambda: distances.DotProductSimilarity(normalize_embeddings=False),
    "lp": distances.LpDistance,
    "lp-unnormalised-p1": lambda: distances.LpDistance(normalize_embeddings=False, p=1),
    "snr": distances.SNRDistance,
    "cosine-squared": lambda: distances.CosineSimilarity(power=2),
}


@pytest.mark.parametrize("distance", list(DISTANCES), ids=list(DISTANCES))
@pytest.mark.parametrize("mined", [False, True], ids=["all-pairs", "mined"])
def test_every_pml_distance_gives_pmls_loss(distance, mined):
    embeddings, labels = batch(30, 10, 4, seed=6)
    indices_tuple = miners.MultiSimilarityMiner()(embeddings, labels) if mined else None
    ours, theirs = both(distance=DISTANCES[distance]())
    assert_same(value_and_grads(ours, [embeddings], labels, indices_tuple),
                value_and_grads(theirs, [embeddings], labels, indices_tuple))


@pytest.mark.parametrize("distance", ["lp", "snr", "cosine-squared"])
def test_a_distance_without_a_blockwise_form_warns_at_construction(distance):
    with pytest.warns(UserWarning, match="full N×M matrix"):
        fastcontrast.SupConLoss(distance=DISTANCES[distance]())


@pytest.mark.parametrize("distance", ["cosine", "dot-product", "dot-product-unnormalised"])
def test_blockwise_distances_do_not_warn(distance):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastcontrast.SupConLoss(distance=DISTANCES[distance]())


REDUCERS = {
    "mean": reducers.MeanReducer,
    "sum": reducers.SumReducer,
    "threshold": lambda: reducers.ThresholdReducer(low=3.0, high=4.5),
    "avg-non-zero": reducers.AvgNonZeroReducer,
    "do-nothing-per-anchor": reducers.PerAnchorReducer,
}


@pytest.mark.parametrize("reducer", list(REDUCERS), ids=list(REDUCERS))
def test_every_pml_reducer_receives_pmls_per_anchor_losses(reducer):
    embeddings, labels = batch(32, 10, 4, seed=7)
    ours, theirs = both(reducer=REDUCERS[reducer]())
    assert_same(value_and_grads(ours, [embeddings], labels), value_and_grads(theirs, [embeddings], labels))


@pytest.mark.parametrize("reducer", [None, "mean"])
def test_an_embedding_regulariser_is_added_as_in_pml(reducer):
    embeddings, labels = batch(32, 10, 4, seed=8)
    kwargs = dict(embedding_regularizer=regularizers.LpRegularizer(), embedding_reg_weight=0.3)
    if reducer is not None:
        kwargs["reducer"] = REDUCERS[reducer]()
    ours, theirs = both(**kwargs)
    assert_same(value_and_grads(ours, [embeddings], labels), value_and_grads(theirs, [embeddings], labels))


def test_a_zero_loss_batch_with_a_custom_reducer_is_pmls_zero():
    embeddings, labels = batch(5, 4, 1, seed=9)  # one class: no negative pair
    ours, theirs = both(reducer=reducers.MeanReducer())
    assert_same(value_and_grads(ours, [embeddings], labels), value_and_grads(theirs, [embeddings], labels))


def test_pml_keywords_are_accepted_and_unknown_ones_are_type_errors():
    fastcontrast.SupConLoss(temperature=0.1, collect_stats=True, embedding_reg_weight=2.0)
    with pytest.raises(TypeError):
        fastcontrast.SupConLoss(temperature=0.1, margin=0.5)
    with pytest.raises(TypeError):
        losses.SupConLoss(temperature=0.1, margin=0.5)


def test_custom_distance_reducer_or_regulariser_with_gather_distributed_is_refused_at_construction():
    for kwargs in (dict(distance=distances.LpDistance()), dict(reducer=reducers.MeanReducer()),
                   dict(embedding_regularizer=regularizers.LpRegularizer())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with pytest.raises(ValueError, match="gather_distributed"):
                fastcontrast.SupConLoss(gather_distributed=True, **kwargs)


def test_fp32_mined_loss_matches_pml_to_fp32_rounding():
    embeddings, labels = batch(48, 32, 5, seed=11, dtype=torch.float32)
    indices_tuple = miners.MultiSimilarityMiner()(embeddings, labels)
    ours, theirs = both()
    assert_same(value_and_grads(ours, [embeddings], labels, indices_tuple),
                value_and_grads(theirs, [embeddings], labels, indices_tuple), rtol=2e-5, atol=2e-6)
