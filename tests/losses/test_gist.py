"""fastcontrast's ``GISTEmbedLoss`` against the real sentence-transformers 6.2.0 ``GISTEmbedLoss``.

Both run their own ``forward`` on stand-in models that return given embeddings (the guide's correlated with
the model's, so the guide's mask leaves out real candidates), with one tokenizer for both (no retokenising):
values and gradients in fp64 for both margin strategies, several margins, with and without anchor / positive
contrast, pairs and triplets, N = 1; in fp32 with several row chunks; the guide-masked LSE's memory bound;
the Triton engine (in the interpreter) in fp32 and bf16 and on ties; bad inputs.
"""

from __future__ import annotations

import itertools
import logging
import warnings

import pytest
import torch
from _helpers import BOUND, BOUND_N, TOLERANCES, TensorSizeRecorder, assert_close
from torch import nn

import fastcontrast
from fastcontrast import reference
from fastcontrast.losses._masked_lse import guide_masked_lse

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from sentence_transformers.base.losses.merged_forward import column_merging_disabled  # noqa: E402

TEMPERATURE = 0.05


def _tokenizer():
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "word": 1}, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")


class EmbeddingLookup(nn.Module):
    """A stand-in SentenceTransformer: returns the embedding stored under ``key`` in each column's features."""

    def __init__(self, key, tokenizer):
        super().__init__()
        self.key, self.tokenizer, self.max_seq_length = key, tokenizer, 32

    def forward(self, features):
        return {"sentence_embedding": features[self.key]}


@pytest.fixture(scope="module")
def models():
    tokenizer = _tokenizer()
    return EmbeddingLookup("model", tokenizer), EmbeddingLookup("guide", tokenizer)


def embeddings(n, columns, dtype=torch.float64, seed=0, d=6):
    g = torch.Generator().manual_seed(seed)
    model = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(columns)]
    # The guide agrees with the model on 4 of its 5 dims, so it rates many in-batch candidates above a positive.
    guide = [torch.cat([x[:, :4], 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)], dim=1) for x in model]
    return [x.to(dtype) for x in model], [x.to(dtype) for x in guide]


def run(loss, model_columns, guide_columns):
    live = [x.clone().requires_grad_() for x in model_columns]
    features = [{"model": x, "guide": g} for x, g in zip(live, guide_columns)]
    with column_merging_disabled():  # one forward per column, so the stand-ins see their own dicts
        value = loss(features, None)
    return value.detach(), torch.autograd.grad(value, live)


def assert_matches(got, expected, atol, rtol, what):
    (value, grads), (expected_value, expected_grads) = got, expected
    assert_close(f"{what}: loss", value, expected_value, atol, rtol)
    for j, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
        assert_close(f"{what}: d embeddings[{j}]", grad, expected_grad, atol, rtol)


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


GIST_CASES = [
    pytest.param(strategy, margin, anchors, positives, columns, n,
                 id=f"{strategy}-m{margin}-aa{int(anchors)}-pp{int(positives)}-cols{columns}-N{n}")
    for strategy, margin, anchors, positives, columns, n in itertools.product(
        ("absolute", "relative"), (0.0, 0.1, -0.3), (True, False), (True, False), (2, 3), (1, 6))
]


@pytest.mark.parametrize("strategy, margin, anchors, positives, columns, n", GIST_CASES)
def test_gist_matches_sentence_transformers_in_fp64(models, strategy, margin, anchors, positives, columns, n):
    model, guide = models
    options = dict(temperature=TEMPERATURE, margin_strategy=strategy, margin=margin, contrast_anchors=anchors,
                   contrast_positives=positives)
    model_columns, guide_columns = embeddings(n, columns, seed=n * 7 + columns)
    expected = run(st_losses.GISTEmbedLoss(model, guide, **options), model_columns, guide_columns)
    # 64 bytes per chunk: one or two rows per chunk, so the chunk loop and its edges are exercised.
    got = run(fastcontrast.GISTEmbedLoss(model, guide, chunk_bytes=64, **options), model_columns, guide_columns)
    assert_matches(got, expected, 1e-11, 1e-11, f"fp64 {strategy} margin={margin} aa={anchors} pp={positives} "
                                               f"columns={columns} N={n}")


def test_the_guide_mask_changes_the_loss_so_the_comparisons_see_it(models):
    model, guide = models
    model_columns, guide_columns = embeddings(6, 3, seed=3)
    masked = run(fastcontrast.GISTEmbedLoss(model, guide, temperature=TEMPERATURE), model_columns, guide_columns)
    unmasked = run(fastcontrast.GISTEmbedLoss(model, guide, temperature=TEMPERATURE, margin=-10.0), model_columns,
                   guide_columns)
    assert (masked[0] - unmasked[0]).abs() > 1e-3, "the guide masked nothing: the fp64 tests would not test it"


@pytest.mark.parametrize("chunk_bytes", [None, 200])
def test_gist_fp32_matches_sentence_transformers(models, chunk_bytes):
    model, guide = models
    model_columns, guide_columns = embeddings(33, 3, dtype=torch.float32, seed=5, d=48)
    options = dict(temperature=TEMPERATURE, margin=0.05)
    expected = run(st_losses.GISTEmbedLoss(model, guide, **options), model_columns, guide_columns)
    got = run(fastcontrast.GISTEmbedLoss(model, guide, chunk_bytes=chunk_bytes, **options), model_columns,
              guide_columns)
    atol, rtol = TOLERANCES[torch.float32]
    assert_matches(got, expected, atol, rtol, f"fp32 chunk_bytes={chunk_bytes}")


def test_reference_backend_matches_sentence_transformers(models):
    model, guide = models
    model_columns, guide_columns = embeddings(5, 3, seed=11)
    options = dict(temperature=TEMPERATURE, margin_strategy="relative", margin=0.1)
    expected = run(st_losses.GISTEmbedLoss(model, guide, **options), model_columns, guide_columns)
    got = run(fastcontrast.GISTEmbedLoss(model, guide, backend="reference", **options), model_columns, guide_columns)
    assert_matches(got, expected, 1e-12, 1e-12, "reference backend")
    live = [x.clone().requires_grad_() for x in model_columns]
    value = reference.gist_loss_reference(live, guide_columns, live[1], guide_columns[1], TEMPERATURE, "relative",
                                          0.1)
    assert_close("gist_loss_reference", value, expected[0], 1e-12)


def test_guide_masked_lse_creates_no_tensor_of_a_quarter_of_n_squared():
    n = BOUND_N  # the memory-bound tests' size, default chunk size
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, 32, generator=g).requires_grad_() for _ in range(2))
    a_guide, b_guide = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    threshold = torch.zeros(n)
    with TensorSizeRecorder() as forward:
        lse = guide_masked_lse(a, b, a_guide, b_guide, threshold, 10.0, protect_offset=0)
    with TensorSizeRecorder() as backward:
        lse.sum().backward()
    for phase, recorder in (("forward", forward), ("backward", backward)):
        numel, op = recorder.largest()
        assert numel < BOUND, f"{phase}: {op} created {numel} elements, bound {BOUND} (N² = {n * n})"


@pytest.mark.parametrize("strategy, margin, anchors, positives, columns, n", [
    c for c in GIST_CASES if c.values[1] != -0.3 and (c.values[2] == c.values[3])
])
def test_gist_on_triton_matches_sentence_transformers_in_fp32(models, strategy, margin, anchors, positives, columns,
                                                              n):
    """The Triton engine's masked kernels (in the interpreter): the guide's tile beside the model's, thresholds in
    the kernels' own arithmetic, against 6.2.0 on the same fp32 inputs."""
    model, guide = models
    options = dict(temperature=TEMPERATURE, margin_strategy=strategy, margin=margin, contrast_anchors=anchors,
                   contrast_positives=positives)
    model_columns, guide_columns = embeddings(n, columns, dtype=torch.float32, seed=n * 7 + columns, d=48)
    expected = run(st_losses.GISTEmbedLoss(model, guide, **options), model_columns, guide_columns)
    got = run(fastcontrast.GISTEmbedLoss(model, guide, backend="triton", **options), model_columns, guide_columns)
    assert_matches(got, expected, *TOLERANCES[torch.float32], f"triton fp32 {strategy} margin={margin} "
                                                              f"aa={anchors} pp={positives} columns={columns} N={n}")


def test_gist_on_triton_with_bf16_embeddings_matches_sentence_transformers(models):
    """bf16 model embeddings, fp32 guide: 6.2.0 in fp64 on the same rounded inputs (its guide mask then in fp64;
    none of the guide's similarities here lies within fp32 rounding of a threshold)."""
    model, guide = models
    model_columns, guide_columns = embeddings(20, 3, seed=4, d=48)
    model_columns = [x.to(torch.bfloat16) for x in model_columns]
    guide_columns = [x.float() for x in guide_columns]
    options = dict(temperature=TEMPERATURE, margin=0.05)
    expected = run(st_losses.GISTEmbedLoss(model, guide, **options), [x.double() for x in model_columns],
                   [x.double() for x in guide_columns])
    got = run(fastcontrast.GISTEmbedLoss(model, guide, backend="triton", **options), model_columns, guide_columns)
    assert_matches(got, expected, *TOLERANCES[torch.bfloat16], "triton bf16")


def test_gist_on_triton_keeps_duplicate_texts_that_tie_with_the_threshold(models):
    """As the torch engine's test below, on the Triton engine: positive i is anchor i + 1's text, so the guide
    rates anchor i + 1 exactly as the positive; the kernels compare it with a threshold from their own
    arithmetic for that pair, so it ties (kept, as in 6.2.0) instead of tipping over by a rounding."""
    model, guide = models
    g = torch.Generator().manual_seed(8)
    base = torch.randn(1, 384, generator=g)
    texts = base + 0.05 * torch.randn(9, 384, generator=g)
    model_columns = [texts[:6], texts[1:7], texts[3:9]]
    guide_columns = [x.clone() for x in model_columns]
    expected = run(st_losses.GISTEmbedLoss(model, guide, temperature=TEMPERATURE), model_columns, guide_columns)
    got = run(fastcontrast.GISTEmbedLoss(model, guide, temperature=TEMPERATURE, backend="triton"), model_columns,
              guide_columns)
    assert_matches(got, expected, *TOLERANCES[torch.float32], "triton fp32 duplicates at the threshold")


def test_triton_backend_on_float64_guides_is_a_clear_error(models):
    with pytest.raises(TypeError, match="float64"):
        fastcontrast.functional.gist_embed_loss([torch.randn(2, 3)] * 2, [torch.randn(2, 3, dtype=torch.float64)] * 2,
                                                backend="triton")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(margin_strategy="both"), ValueError, "margin_strategy must be"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(contrast_anchors="no"), TypeError, "contrast_anchors"),
])
def test_bad_options_raise_clear_errors(models, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastcontrast.GISTEmbedLoss(*models, **kwargs)


def test_models_without_tokenizers_are_refused_as_sentence_transformers_does():
    with pytest.raises(ValueError, match="tokenizer attribute"):
        fastcontrast.GISTEmbedLoss(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="tokenizer attribute"):
        st_losses.GISTEmbedLoss(nn.Linear(2, 2), nn.Linear(2, 2))


@pytest.mark.parametrize("columns, guides, error, match", [
    ([torch.randn(3, 4)] * 4, [torch.randn(3, 4)] * 4, ValueError, "Expected 2 or 3 embeddings"),
    ([torch.randn(3, 4)] * 2, [torch.randn(3, 4)] * 3, ValueError, "same columns"),
    ([torch.randn(3, 4)] * 2, [torch.randn(2, 4)] * 2, ValueError, "batch size"),
    ([torch.randn(3, 4), torch.randn(2, 4)], [torch.randn(3, 4)] * 2, ValueError, "same batch size"),
    ([torch.randn(3, 4)] * 2, [torch.randn(3, 4, device="meta")] * 2, ValueError, "device of `embeddings`"),
])
def test_bad_embeddings_raise_errors_naming_the_argument(columns, guides, error, match):
    with pytest.raises(error, match=match):
        fastcontrast.functional.gist_embed_loss(columns, guides)


def test_config_and_citation_equal_sentence_transformers(models):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastcontrast.GISTEmbedLoss(*models, margin=0.2, contrast_anchors=False)
        theirs = st_losses.GISTEmbedLoss(*models, margin=0.2, contrast_anchors=False)
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert ours.citation == theirs.citation


def test_duplicate_texts_tie_with_the_threshold_and_are_masked_exactly_as_sentence_transformers(models):
    """Positive i is anchor i + 1's text, so guide cos(aᵢ, aᵢ₊₁) equals the threshold cos(aᵢ, pᵢ) exactly in
    6.2.0's per-pair arithmetic (not masked: the rule is a strict >); a GEMM's rounding would tip some of
    them over. Nearly parallel rows (an untrained model's) make many more entries crowd the threshold."""
    model, guide = models
    g = torch.Generator().manual_seed(8)
    base = torch.randn(1, 384, generator=g)
    texts = base + 0.05 * torch.randn(9, 384, generator=g)  # 9 "texts", cosines ≈ 0.99
    anchors, positives, negatives = texts[:6], texts[1:7], texts[3:9]
    model_columns = [anchors, positives, negatives]
    guide_columns = [x.clone() for x in model_columns]
    expected = run(st_losses.GISTEmbedLoss(model, guide, temperature=TEMPERATURE), model_columns, guide_columns)
    got = run(fastcontrast.GISTEmbedLoss(model, guide, temperature=TEMPERATURE), model_columns, guide_columns)
    atol, rtol = TOLERANCES[torch.float32]
    assert_matches(got, expected, atol, rtol, "fp32 duplicates at the threshold")
