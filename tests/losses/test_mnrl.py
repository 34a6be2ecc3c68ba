"""fastcontrast's ``MultipleNegativesRankingLoss`` family against the real sentence-transformers 6.2.0 classes.

``compute_loss_from_embeddings`` values and gradients of every embedding column, for every direction set,
partition mode, hardness mode and number of hard negatives (k = 0…3), N = 1 included, with ``cos_sim`` and
``dot_score``: fp64 to rounding on the torch engine, fp32 on both engines (Triton in its interpreter), bf16
for a few. Then the options 6.2.0 refuses, bad inputs, a custom similarity, the symmetric alias, and the
config/citation surface.
"""

from __future__ import annotations

import itertools
import logging
import warnings

import pytest
import torch
from _helpers import TOLERANCES, assert_close

import fastcontrast
from fastcontrast import reference
from fastcontrast.losses import mnrl

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
from sentence_transformers import util as st_util  # noqa: E402

DIRECTION_SETS = {
    "q2d": ("query_to_doc",),
    "q2d+d2q": ("query_to_doc", "doc_to_query"),
    "q2d+q2q": ("query_to_doc", "query_to_query"),
    "q2d+d2d": ("query_to_doc", "doc_to_doc"),
    "all4": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
}
HARDNESS = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
SCALE = 7.0
STRENGTH = 2.5


def _valid(directions, partition_mode):
    return partition_mode == "joint" or not set(directions) & {"query_to_query", "doc_to_doc"}


CASES = [
    pytest.param(name, partition_mode, hardness, k, n, id=f"{name}-{partition_mode}-{hardness}-k{k}-N{n}")
    for name, partition_mode, hardness, k, n in itertools.product(
        DIRECTION_SETS, ("joint", "per_direction"), HARDNESS, (0, 1, 3), (1, 5)
    )
    if _valid(DIRECTION_SETS[name], partition_mode)
]


def columns(n, k, d=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows far from unit length, so that a missing or doubled normalisation shows in the gradients.
    return [(torch.randn(n, d, generator=g, dtype=torch.float64) * 3).to(dtype) for _ in range(k + 2)]


def options(directions, partition_mode, hardness, similarity):
    return dict(scale=SCALE, similarity_fct=similarity, directions=DIRECTION_SETS[directions],
                partition_mode=partition_mode, hardness_mode=hardness,
                hardness_strength=STRENGTH if hardness else 0.0)


def value_and_grads(loss, embeddings):
    live = [x.clone().requires_grad_() for x in embeddings]
    value = loss.compute_loss_from_embeddings(live, None)
    return value.detach(), torch.autograd.grad(value, live)


def theirs(embeddings, **kwargs):
    """6.2.0's loss and gradients, computed in fp64 from the same (possibly rounded) inputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = st_losses.MultipleNegativesRankingLoss(None, **kwargs)
    return value_and_grads(loss, [x.to(torch.float64) for x in embeddings])


def ours(embeddings, backend, **kwargs):
    return value_and_grads(fastcontrast.MultipleNegativesRankingLoss(None, backend=backend, **kwargs), embeddings)


def assert_matches(got, expected, atol, rtol, what):
    (value, grads), (expected_value, expected_grads) = got, expected
    assert_close(f"{what}: loss", value, expected_value, atol, rtol)
    for j, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
        assert_close(f"{what}: d embeddings[{j}]", grad, expected_grad, atol, rtol)


@pytest.fixture(autouse=True)
def _quiet_sentence_transformers():
    # 6.2.0 logs a warning for hardness_mode with strength 0; the tests build such losses on purpose.
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("directions, partition_mode, hardness, k, n", CASES)
def test_mnrl_matches_sentence_transformers_in_fp64(directions, partition_mode, hardness, k, n, similarity):
    kwargs = options(directions, partition_mode, hardness, getattr(st_util, similarity))
    embeddings = columns(n, k, seed=k * 10 + n)
    assert_matches(ours(embeddings, "torch", **kwargs), theirs(embeddings, **kwargs), 1e-11, 1e-11,
                   f"fp64 {directions} {partition_mode} {hardness} k={k} N={n} {similarity}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("directions, partition_mode, hardness, k, n", [
    c for c in CASES if c.values[3] in (0, 3) and c.values[4] == 5 or c.values[:3] == ("all4", "joint", None)
])
def test_mnrl_matches_sentence_transformers_in_fp32(directions, partition_mode, hardness, k, n, backend):
    kwargs = options(directions, partition_mode, hardness, st_util.cos_sim)
    embeddings = columns(n, k, d=48, dtype=torch.float32, seed=n + k)
    atol, rtol = TOLERANCES[torch.float32]
    assert_matches(ours(embeddings, backend, **kwargs), theirs(embeddings, **kwargs), atol, rtol,
                   f"fp32 {backend} {directions} {partition_mode} {hardness} k={k} N={n}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("directions, hardness", [("q2d", None), ("all4", "all_negatives"), ("q2d+d2q", None)])
def test_mnrl_bf16_matches_sentence_transformers_fp64_of_the_same_inputs(directions, hardness, backend):
    partition_mode = "per_direction" if directions == "q2d+d2q" else "joint"
    kwargs = options(directions, partition_mode, hardness, st_util.cos_sim)
    embeddings = columns(9, 2, d=48, dtype=torch.bfloat16, seed=3)
    atol, rtol = TOLERANCES[torch.bfloat16]
    assert_matches(ours(embeddings, backend, **kwargs), theirs(embeddings, **kwargs), atol, rtol,
                   f"bf16 {backend} {directions} {hardness}")


def test_fastcontrast_similarity_functions_equal_sentence_transformers_ones():
    a, b = columns(4, 0, d=5)
    for name in ("cos_sim", "dot_score"):
        assert_close(name, getattr(mnrl, name)(a, b), getattr(st_util, name)(a, b), 1e-14)
        assert mnrl.similarity_kind(getattr(mnrl, name)) == name
        assert mnrl.similarity_kind(getattr(st_util, name)) == name


def test_custom_similarity_runs_as_given_with_a_warning_and_matches_sentence_transformers():
    def scaled_cosine(a, b):
        return 0.5 * st_util.cos_sim(a, b) + 0.1

    with pytest.warns(UserWarning, match="builds the full similarity matrices"):
        loss = fastcontrast.MultipleNegativesRankingLoss(None, scale=SCALE, similarity_fct=scaled_cosine,
                                                         directions=DIRECTION_SETS["all4"],
                                                         hardness_mode="all_negatives", hardness_strength=STRENGTH)
    embeddings = columns(5, 2)
    expected = theirs(embeddings, scale=SCALE, similarity_fct=scaled_cosine, directions=DIRECTION_SETS["all4"],
                      hardness_mode="all_negatives", hardness_strength=STRENGTH)
    assert_matches(value_and_grads(loss, embeddings), expected, 1e-12, 1e-12, "custom similarity")


def test_reference_matches_sentence_transformers():
    embeddings = columns(6, 2)
    for name, partition_mode, hardness in [("all4", "joint", "in_batch_negatives"), ("q2d+d2q", "per_direction",
                                                                                       "hard_negatives")]:
        kwargs = options(name, partition_mode, hardness, st_util.cos_sim)
        live = [x.clone().requires_grad_() for x in embeddings]
        value = reference.mnrl_loss_reference(live[0], live[0], live[1:], SCALE, st_util.cos_sim,
                                              DIRECTION_SETS[name], partition_mode, hardness, STRENGTH)
        assert_matches((value.detach(), torch.autograd.grad(value, live)), theirs(embeddings, **kwargs), 1e-12,
                       1e-12, f"reference {name} {hardness}")


def test_mnrl_gradcheck_on_the_torch_engine_with_every_direction():
    # Without a hardness penalty: its stop-gradient makes the analytic gradient differ from the numeric one
    # by design (the fp64 comparisons with 6.2.0 above cover it).
    loss = fastcontrast.MultipleNegativesRankingLoss(None, scale=3.0, directions=DIRECTION_SETS["all4"],
                                                     backend="torch")
    embeddings = [x.requires_grad_() for x in columns(3, 1, d=4)]
    assert torch.autograd.gradcheck(lambda *e: loss.compute_loss_from_embeddings(list(e), None), embeddings)


def test_symmetric_alias_matches_sentence_transformers_with_and_without_negatives():
    for k in (0, 2):
        embeddings = columns(5, k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            original = st_losses.MultipleNegativesSymmetricRankingLoss(None, scale=SCALE)
        loss = fastcontrast.MultipleNegativesSymmetricRankingLoss(None, scale=SCALE, backend="torch")
        assert loss.directions == original.directions and loss.partition_mode == original.partition_mode
        assert isinstance(loss, fastcontrast.MultipleNegativesRankingLoss)
        assert_matches(value_and_grads(loss, embeddings), value_and_grads(original, embeddings), 1e-12, 1e-12,
                       f"symmetric k={k}")


def test_default_reduces_to_one_blockwise_call_with_its_positive_from_the_tiles(monkeypatch):
    calls = []
    apply = mnrl.BlockwiseLogSumExp.apply

    def counting(*args):
        calls.append(args[6] is not None)
        return apply(*args)

    monkeypatch.setattr(mnrl.BlockwiseLogSumExp, "apply", counting)
    fastcontrast.MultipleNegativesRankingLoss(None, backend="torch").compute_loss_from_embeddings(columns(4, 3), None)
    assert calls == [True], f"expected one call with a positive index, got {calls}"


@pytest.mark.parametrize("kwargs, error, match, original_refuses", [
    (dict(scale=0.0), ValueError, "Scale must be a positive value", True),
    (dict(directions=()), ValueError, "At least one direction", True),
    (dict(directions=("doc_to_query",)), ValueError, "'query_to_doc' direction is required", True),
    (dict(directions=("query_to_doc", "sideways")), ValueError, "Invalid directions", True),
    (dict(directions="query_to_doc"), ValueError, "tuple of direction names", False),
    (dict(partition_mode="mixed"), ValueError, "partition_mode must be", True),
    (dict(directions=("query_to_doc", "query_to_query"), partition_mode="per_direction"), ValueError,
     "per_direction", True),
    (dict(directions=("query_to_doc", "doc_to_doc"), partition_mode="per_direction"), ValueError,
     "per_direction", True),
    (dict(hardness_mode="hardest"), ValueError, "hardness_mode must be one of", True),
    (dict(hardness_mode="hard_negatives", hardness_strength=-1.0), ValueError, "hardness_strength must be", True),
    (dict(backend="cuda"), ValueError, "`backend` must be one of", False),
    (dict(chunk_bytes=0), ValueError, "chunk_bytes", False),
    (dict(gather_across_devices="yes"), TypeError, "gather_across_devices", False),
    (dict(similarity_fct="cos_sim"), TypeError, "similarity_fct", False),
])
def test_bad_options_raise_the_error_sentence_transformers_raises_or_a_clearer_one(kwargs, error, match,
                                                                                   original_refuses):
    with pytest.raises(error, match=match):
        fastcontrast.MultipleNegativesRankingLoss(None, **kwargs)
    if original_refuses:
        with pytest.raises(error):
            st_losses.MultipleNegativesRankingLoss(None, **kwargs)


@pytest.mark.parametrize("embeddings, error, match", [
    ([torch.randn(3, 4)], ValueError, "Expected at least 2 embeddings"),
    (torch.randn(2, 3, 4), TypeError, "list of"),
    ([torch.randn(3, 4), torch.randn(2, 4)], ValueError, "same batch size"),
    ([torch.randn(3, 4), torch.randn(3, 5)], ValueError, "same feature dim"),
    ([torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)], TypeError, "same dtype"),
    ([torch.randn(3), torch.randn(3)], ValueError, "2-D"),
    ([torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64)], TypeError, "float"),
])
def test_bad_embeddings_raise_errors_naming_the_column(embeddings, error, match):
    with pytest.raises(error, match=match):
        fastcontrast.MultipleNegativesRankingLoss(None, backend="torch").compute_loss_from_embeddings(embeddings, None)


def test_triton_backend_on_float64_is_a_clear_error():
    with pytest.raises(TypeError, match="float64"):
        fastcontrast.MultipleNegativesRankingLoss(None, backend="triton").compute_loss_from_embeddings(
            columns(3, 0), None)


def test_hardness_mode_without_strength_warns_as_sentence_transformers_logs():
    with pytest.warns(UserWarning, match="hardness_strength=0.0"):
        fastcontrast.MultipleNegativesRankingLoss(None, hardness_mode="hard_negatives")


def test_config_temperature_and_citation_equal_sentence_transformers():
    for kwargs in [dict(), dict(directions=DIRECTION_SETS["all4"], scale=50.0, similarity_fct=st_util.dot_score),
                   dict(directions=DIRECTION_SETS["q2d+d2q"], partition_mode="per_direction",
                        hardness_mode="in_batch_negatives", hardness_strength=9.0)]:
        loss = fastcontrast.MultipleNegativesRankingLoss(None, **kwargs)
        original = st_losses.MultipleNegativesRankingLoss(None, **kwargs)
        assert loss.get_config_dict() == original.get_config_dict()
        assert loss.citation == original.citation
        assert loss.temperature == original.temperature


def test_constructor_signature_extends_sentence_transformers_in_order():
    import inspect

    original = list(inspect.signature(st_losses.MultipleNegativesRankingLoss.__init__).parameters.values())
    ours_ = list(inspect.signature(fastcontrast.MultipleNegativesRankingLoss.__init__).parameters.values())
    assert [p.name for p in ours_[: len(original)]] == [p.name for p in original]
    for mine, theirs_ in zip(ours_[2: len(original)], original[2:]):
        same = mine.default == theirs_.default or (mine.name == "similarity_fct")
        assert same, f"default of {mine.name}: {mine.default!r} != {theirs_.default!r}"
    extra = {p.name for p in ours_[len(original):]}
    assert extra == {"backend", "chunk_bytes", "process_group", "false_negative_margin"}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours_[len(original):])


FALSE_NEGATIVE_CASES = [
    pytest.param(name, partition_mode, hardness, k, margin, id=f"{name}-{partition_mode}-{hardness}-k{k}-m{margin}")
    for name, partition_mode, hardness, k, margin in itertools.product(
        ("q2d", "q2d+d2q", "all4"), ("joint", "per_direction"), HARDNESS, (0, 2), (0.0, 0.1, -0.2))
    if _valid(DIRECTION_SETS[name], partition_mode)
]


@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("directions, partition_mode, hardness, k, margin", FALSE_NEGATIVE_CASES)
def test_false_negative_margin_matches_the_full_matrix_reference(directions, partition_mode, hardness, k, margin,
                                                                 similarity):
    fct = getattr(mnrl, similarity)
    embeddings = columns(6, k, d=5, seed=k)
    strength = STRENGTH if hardness else 0.0
    live = [x.clone().requires_grad_() for x in embeddings]
    expected = reference.mnrl_loss_reference(live[0], live[0], live[1:], SCALE, fct, DIRECTION_SETS[directions],
                                             partition_mode, hardness, strength, false_negative_margin=margin)
    expected = (expected.detach(), torch.autograd.grad(expected, live))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = fastcontrast.MultipleNegativesRankingLoss(
            None, scale=SCALE, similarity_fct=fct, directions=DIRECTION_SETS[directions],
            partition_mode=partition_mode, hardness_mode=hardness, hardness_strength=strength,
            false_negative_margin=margin, chunk_bytes=128)  # a few rows per chunk
    assert_matches(value_and_grads(loss, embeddings), expected, 1e-11, 1e-11,
                   f"false_negative_margin={margin} {directions} {partition_mode} {hardness} k={k} {similarity}")


def test_false_negative_mask_follows_the_rule_sim_above_positive_plus_margin():
    """Written out per row for the default direction: candidates j ≠ i with sim(qᵢ, dⱼ) > sim(qᵢ, dᵢ) + m are
    left out of row i's softmax."""
    queries, docs = columns(7, 0, d=3, seed=4)
    margin = 0.05
    sims = mnrl.cos_sim(queries, docs)
    expected = []
    for i in range(7):
        kept = [j for j in range(7) if j == i or sims[i, j] <= sims[i, i] + margin]
        expected.append(torch.logsumexp(SCALE * sims[i, kept], dim=0) - SCALE * sims[i, i])
    masked_somewhere = any((sims[i] > sims[i, i] + margin).sum() > 0 for i in range(7))
    assert masked_somewhere, "the batch has no false negative to mask: the test would not test the mask"
    got = fastcontrast.MultipleNegativesRankingLoss(None, scale=SCALE, false_negative_margin=margin
                                                    ).compute_loss_from_embeddings([queries, docs], None)
    assert_close("loss with false-negative mask", got, torch.stack(expected).mean(), 1e-12)


def test_false_negative_margin_too_large_to_mask_anything_equals_sentence_transformers():
    embeddings = columns(5, 2)
    kwargs = options("all4", "joint", "all_negatives", st_util.cos_sim)
    assert_matches(ours(embeddings, "auto", false_negative_margin=10.0, **kwargs), theirs(embeddings, **kwargs),
                   1e-11, 1e-11, "false_negative_margin=10 (masks nothing)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("directions, partition_mode, hardness, k, margin", [
    c for c in FALSE_NEGATIVE_CASES if c.values[1] == "joint" and c.values[3] == 2 or c.values[:2] == ("q2d+d2q",
                                                                                                      "per_direction")
])
def test_false_negative_margin_on_triton_matches_the_full_matrix_reference(directions, partition_mode, hardness, k,
                                                                          margin, dtype):
    """The Triton engine's masked kernels (in the interpreter) against the fp64 reference of the same rounded
    inputs: every direction, hardness mode and margin sign, with the mask leaving out real candidates."""
    embeddings = columns(6, k, d=48, dtype=dtype, seed=k + 1)
    strength = STRENGTH if hardness else 0.0
    live = [x.double().requires_grad_() for x in embeddings]
    expected = reference.mnrl_loss_reference(live[0], live[0], live[1:], SCALE, mnrl.cos_sim,
                                             DIRECTION_SETS[directions], partition_mode, hardness, strength,
                                             false_negative_margin=margin)
    expected = (expected.detach(), torch.autograd.grad(expected, live))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = fastcontrast.MultipleNegativesRankingLoss(
            None, scale=SCALE, directions=DIRECTION_SETS[directions], partition_mode=partition_mode,
            hardness_mode=hardness, hardness_strength=strength, false_negative_margin=margin, backend="triton")
    atol, rtol = TOLERANCES[dtype]
    assert_matches(value_and_grads(loss, embeddings), expected, atol, rtol,
                   f"triton {dtype} false_negative_margin={margin} {directions} {partition_mode} {hardness} k={k}")


def test_false_negative_margin_on_triton_keeps_a_duplicated_positive_at_margin_zero():
    """Document 3 repeats document 0: in row 0 it scores exactly the positive's similarity, which the rule (a
    strict >) keeps at margin 0. The threshold comes from the kernels' own arithmetic, so the tie holds there as in
    the reference; a margin of −1e-3 then leaves it out (and the loss changes)."""
    queries, docs = columns(5, 0, d=48, dtype=torch.float32, seed=9)
    docs[3] = docs[0]
    value = {}
    for margin in (0.0, -1e-3):
        live = [queries.double().requires_grad_(), docs.double().requires_grad_()]
        expected = reference.mnrl_loss_reference(live[0], live[0], live[1:], SCALE, mnrl.cos_sim, ("query_to_doc",),
                                                 "joint", None, 0.0, false_negative_margin=margin)
        expected = (expected.detach(), torch.autograd.grad(expected, live))
        loss = fastcontrast.MultipleNegativesRankingLoss(None, scale=SCALE, false_negative_margin=margin,
                                                         backend="triton")
        got = value_and_grads(loss, [queries, docs])
        assert_matches(got, expected, *TOLERANCES[torch.float32], f"duplicated positive, margin={margin}")
        value[margin] = got[0]
    assert (value[0.0] - value[-1e-3]).abs() > 1e-3, "the duplicate was left out at margin 0, or kept at −1e-3"


def test_bad_false_negative_margins_are_type_errors():
    for bad in ("0.1", float("nan"), True):
        with pytest.raises(TypeError, match="false_negative_margin"):
            fastcontrast.MultipleNegativesRankingLoss(None, false_negative_margin=bad)
