"""fastcontrast's Cached* sentence-transformers losses against the real 6.2.0 classes, through a real model.

``CachedMultipleNegativesRankingLoss``, ``CachedMultipleNegativesSymmetricRankingLoss`` and
``CachedGISTEmbedLoss``: the loss and every parameter's gradient after ``loss.backward()`` (the trainer's
contract), for a tiny randomly initialised BERT (tests/_tiny_models.py) in fp64 and in training mode: its
dropout draws masks in both embedding passes, so the gradients agree only if the re-forward replays each
mini-batch's RNG state on mini-batches of the same shapes as 6.2.0's (which replays too). Batches of 5 rows in
mini-batches of 3 (ragged), or packed by token count. Then the loss against the non-cached one without
dropout, the attributes trainers read, and bad inputs.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from _helpers import TOLERANCES, assert_close
from _tiny_models import SENTENCES, save_tiny_bert

import fastcontrast
from fastcontrast.losses.mnrl import similarity_kind

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
pytest.importorskip("transformers")

ROWS = 5
MINI_BATCH = 3
ATOL, RTOL = TOLERANCES[torch.float64]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # One layer, 16 wide: the tests run the model ~20 times per comparison on a shared 2-core machine.
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), hidden_size=16, layers=1)


def load(model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_dir, device="cpu").double().train()


@pytest.fixture(scope="module")
def model(model_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("USE_HUB_KERNELS", "0")
        yield load(model_dir)


@pytest.fixture(autouse=True)
def _quiet():
    # 6.2.0 logs warnings (hardness options) and deprecations (the symmetric class) the tests provoke on purpose.
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
    logging.disable(logging.NOTSET)


def columns(count):
    """``count`` text columns of ROWS rows, of different lengths, so that mini-batches trim different padding."""
    return [SENTENCES[3 * j:3 * j + ROWS] for j in range(count)]


def step(model, loss, texts, divide_by=1):
    """The trainer's step from a fixed RNG state: ``(loss(features, None) / divide_by).backward()`` (the trainer
    divides for gradient accumulation). Returns the loss, every parameter's gradient by name, and the CPU RNG
    state after the step."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    value = loss([model.preprocess(column) for column in texts], None)
    if getattr(loss, "uses_gradient_cache", False):
        assert value.requires_grad and value.grad_fn is None, "a cached loss is a leaf whose backward runs a hook"
    (value / divide_by).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads, torch.get_rng_state()


def assert_same_step(got, expected, what):
    (value, grads, rng), (expected_value, expected_grads, expected_rng) = got, expected
    assert_close(f"{what}: loss", value, expected_value, ATOL, RTOL)
    assert sorted(grads) == sorted(expected_grads), f"{what}: parameters with a gradient differ"
    for name in expected_grads:
        assert_close(f"{what}: d {name}", grads[name], expected_grads[name], ATOL, RTOL)
    assert torch.equal(rng, expected_rng), f"{what}: the RNG stream ends elsewhere than 6.2.0's"


MNRL_CASES = {
    "pairs-with-progress-bar": dict(negatives=0, show_progress_bar=True),
    "k1-all-directions-joint-all-negatives": dict(
        negatives=1, directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness_mode="all_negatives", hardness_strength=3.0, scale=10.0),
    "k2-symmetric-per-direction-hard-negatives-token-packed": dict(
        negatives=2, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
        hardness_mode="hard_negatives", hardness_strength=2.0, mini_batch_num_tokens=20),
}


@pytest.mark.parametrize("case", MNRL_CASES)
def test_cached_mnrl_matches_sentence_transformers_cached_loss_with_dropout(model, case):
    options = dict(MNRL_CASES[case])
    texts = columns(2 + options.pop("negatives"))
    expected = step(model, st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH, **options),
                    texts)
    got = step(model, fastcontrast.CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH, **options),
               texts)
    assert_same_step(got, expected, case)
    assert len(expected[1]) > 10, "too few parameters received a gradient"


def test_cached_symmetric_mnrl_matches_sentence_transformers_under_gradient_accumulation(model):
    # The trainer divides the loss before backward(): the factor must reach every re-forwarded mini-batch.
    texts = columns(2)
    expected = step(model, st_losses.CachedMultipleNegativesSymmetricRankingLoss(model, scale=15.0,
                                                                                 mini_batch_size=MINI_BATCH), texts, 4)
    got = step(model, fastcontrast.CachedMultipleNegativesSymmetricRankingLoss(model, scale=15.0,
                                                                              mini_batch_size=MINI_BATCH), texts, 4)
    assert_same_step(got, expected, "symmetric, loss / 4")
    undivided = step(model, fastcontrast.CachedMultipleNegativesSymmetricRankingLoss(
        model, scale=15.0, mini_batch_size=MINI_BATCH), texts)
    name = next(name for name in got[1] if name.endswith("output.dense.weight"))
    assert_close(f"d {name}: loss / 4 against loss", got[1][name], undivided[1][name] / 4, ATOL, RTOL)


@pytest.mark.parametrize("margin_strategy, margin, negatives, retokenize", [
    ("absolute", 0.0, 1, False),
    ("relative", 0.05, 0, True),
], ids=["absolute-triplets", "relative-pairs-retokenized"])
def test_cached_gist_matches_sentence_transformers_with_a_guide_that_draws_random_numbers(
        model, model_dir, margin_strategy, margin, negatives, retokenize):
    # The guide is a copy of the model in training mode: its dropout draws from the RNG stream right after the
    # model's, mini-batch by mini-batch, so the replayed states are 6.2.0's only if the guide runs where it does.
    guide = load(model_dir)
    if retokenize:
        guide.max_seq_length = 16  # shorter than the model's: 6.2.0 decodes and retokenises for the guide
    options = dict(temperature=0.05, mini_batch_size=MINI_BATCH, margin_strategy=margin_strategy, margin=margin)
    texts = columns(2 + negatives)
    original = st_losses.CachedGISTEmbedLoss(model, guide, **options)
    assert original.must_retokenize is retokenize
    expected = step(model, original, texts)
    got = step(model, fastcontrast.CachedGISTEmbedLoss(model, guide, **options), texts)
    assert_same_step(got, expected, f"gist {margin_strategy}")


def test_cached_gist_on_triton_matches_sentence_transformers_in_fp32(model_dir):
    """The guide mask on the Triton engine's masked kernels (in the interpreter), inside the cached step: an fp32
    model and a guide copy of it in training mode, against 6.2.0 on the same model, within fp32 tolerances."""
    model, guide = load(model_dir).float(), load(model_dir).float()
    options = dict(temperature=0.05, mini_batch_size=MINI_BATCH, margin=0.0)
    texts = columns(3)
    expected = step(model, st_losses.CachedGISTEmbedLoss(model, guide, **options), texts)
    got = step(model, fastcontrast.CachedGISTEmbedLoss(model, guide, backend="triton", **options), texts)
    (value, grads, rng), (expected_value, expected_grads, expected_rng) = got, expected
    atol, rtol = TOLERANCES[torch.float32]
    assert_close("gist triton: loss", value, expected_value, atol, rtol)
    for name in expected_grads:
        assert_close(f"gist triton: d {name}", grads[name], expected_grads[name], atol, rtol)
    assert torch.equal(rng, expected_rng)


def test_without_dropout_the_cached_loss_is_the_plain_loss(model):
    texts = columns(3)
    model.eval()
    try:
        expected = step(model, fastcontrast.MultipleNegativesRankingLoss(model, directions=("query_to_doc",
                                                                                           "doc_to_doc")), texts)
        got = step(model, fastcontrast.CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=2, directions=("query_to_doc", "doc_to_doc")), texts)
    finally:
        model.train()
    assert_same_step(got, expected, "cached vs plain, eval mode")


def test_evaluation_without_grad_returns_the_loss_and_runs_no_reforward(model):
    texts = columns(2)
    loss = fastcontrast.CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH)
    with torch.no_grad():
        value = loss([model.preprocess(column) for column in texts], None)
    assert not value.requires_grad and value.dim() == 0 and torch.isfinite(value)


def test_matryoshka_decorates_calculate_loss_as_for_the_original(model):
    texts = columns(2)
    expected = step(model, st_losses.MatryoshkaLoss(model, st_losses.CachedMultipleNegativesRankingLoss(
        model, mini_batch_size=MINI_BATCH), matryoshka_dims=[16, 8]), texts)
    got = step(model, st_losses.MatryoshkaLoss(model, fastcontrast.CachedMultipleNegativesRankingLoss(
        model, mini_batch_size=MINI_BATCH), matryoshka_dims=[16, 8]), texts)
    assert_same_step(got, expected, "MatryoshkaLoss(Cached MNRL)")


def test_constructor_attributes_and_config_are_the_originals(model, model_dir):
    import inspect

    pairs = [(fastcontrast.CachedMultipleNegativesRankingLoss, st_losses.CachedMultipleNegativesRankingLoss),
             (fastcontrast.CachedMultipleNegativesSymmetricRankingLoss,
              st_losses.CachedMultipleNegativesSymmetricRankingLoss),
             (fastcontrast.CachedGISTEmbedLoss, st_losses.CachedGISTEmbedLoss)]
    for ours, theirs in pairs:
        mine = inspect.signature(ours.__init__).parameters.values()
        original = inspect.signature(theirs.__init__).parameters.values()
        positional = [(p.name, similarity_kind(p.default) or p.default) for p in mine
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        # fastcontrast's cos_sim is the default similarity_fct, as in the non-cached drop-in: same function.
        assert positional == [(p.name, similarity_kind(p.default) or p.default) for p in original], ours.__name__
        assert {p.name for p in mine if p.kind is inspect.Parameter.KEYWORD_ONLY} >= {"backend", "chunk_bytes"}

    options = dict(scale=7.0, mini_batch_size=4, mini_batch_num_tokens=64, directions=("query_to_doc", "doc_to_query"),
                   partition_mode="per_direction")
    ours, theirs = (cls(model, **options) for cls in (fastcontrast.CachedMultipleNegativesRankingLoss,
                                                      st_losses.CachedMultipleNegativesRankingLoss))
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert (ours.citation, ours.temperature, ours.uses_gradient_cache) == (theirs.citation, theirs.temperature, True)
    ours.scale = 3.0  # as in 6.2.0, the wrapped loss holds the hyperparameters
    assert ours.loss.scale == 3.0 and ours.get_config_dict()["scale"] == 3.0
    assert ours.model is model and ours.loss.model is model

    guide = load(model_dir)
    ours, theirs = (cls(model, guide, temperature=0.1, mini_batch_size=4, margin=0.2) for cls in
                    (fastcontrast.CachedGISTEmbedLoss, st_losses.CachedGISTEmbedLoss))
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert ours.uses_gradient_cache and not hasattr(ours, "citation") and not hasattr(theirs, "citation")


@pytest.mark.parametrize("cls", ["CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss"])
@pytest.mark.parametrize("option, value, error", [
    ("mini_batch_size", 0, ValueError),
    ("mini_batch_size", 2.5, TypeError),
    ("mini_batch_size", True, TypeError),
    ("mini_batch_num_tokens", 0, ValueError),
    ("mini_batch_num_tokens", "64", TypeError),
    ("show_progress_bar", "yes", TypeError),
    ("backend", "gpu", ValueError),
])
def test_bad_options_raise_naming_the_argument(cls, option, value, error):
    with pytest.raises(error, match=f"`?{option}`?"):
        getattr(fastcontrast, cls)(None, **{option: value})


def test_bad_gist_options_raise_naming_the_argument():
    with pytest.raises(ValueError, match="`mini_batch_size`"):
        fastcontrast.CachedGISTEmbedLoss(None, None, mini_batch_size=0)
    with pytest.raises(ValueError, match="margin_strategy"):
        fastcontrast.CachedGISTEmbedLoss(None, None, margin_strategy="other")


def test_bad_batches_raise_before_any_forward(model):
    features = [model.preprocess(column) for column in columns(4)]
    with pytest.raises(ValueError, match="Expected at least 2 inputs, got 1"):
        fastcontrast.CachedMultipleNegativesRankingLoss(model)(features[:1], None)
    with pytest.raises(ValueError, match="needs the `model`"):
        fastcontrast.CachedMultipleNegativesRankingLoss(None)(features[:2], None)
    with pytest.raises(ValueError, match="Expected 2 or 3 inputs"):
        fastcontrast.CachedGISTEmbedLoss(model, model)(features, None)


def test_a_failing_reforward_raises_partial_gradient_error(model, monkeypatch):
    loss = fastcontrast.CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH)
    value = loss([model.preprocess(column) for column in columns(2)], None)
    calls = []

    def forward(features):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory in mini-batch 3")
        return type(model).forward(model, features)

    monkeypatch.setattr(model, "forward", forward)
    model.zero_grad(set_to_none=True)
    with pytest.raises(fastcontrast.PartialGradientError, match=r"partial \(2 of 4 chunks") as info:
        value.backward()
    assert "out of memory in mini-batch 3" in str(info.value.__cause__)
