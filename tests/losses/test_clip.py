"""CLIP (open_clip 3.x ``ClipLoss``, ``clip_loss``) and ``CoCaLoss`` against open_clip's math
(``fastcontrast.reference``) on the blockwise torch engine: values and every gradient over the covering design of
shapes, the module's call forms, and CoCa's caption term. Distributed modes: tests/distributed/.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    TOLERANCES,
    TensorSizeRecorder,
    assert_close,
)
from _reference_cases import (
    CASES,
    DTYPES,
    check_open_clip_case,
    check_open_clip_exponentiated_scale,
    check_open_clip_gradient_flow,
)

from fastcontrast import ClipLoss, CoCaLoss, reference


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("kind", ('clip_loss', 'ClipLoss'))
def test_clip_loss_matches_reference_value_and_gradients(kind, case, dtype, atol, rtol):
    check_open_clip_case(kind, case, dtype, atol, rtol)


@pytest.mark.parametrize("kind", ('clip_loss', 'ClipLoss'))
def test_clip_loss_matches_reference_for_exponentiated_non_leaf_scale(kind):
    check_open_clip_exponentiated_scale(kind)


def test_clip_loss_gradient_flows_only_to_inputs_that_require_it():
    check_open_clip_gradient_flow("clip_loss")


def unit(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)


def test_clip_loss_without_bias_takes_three_positional_arguments():
    image, text = unit(6, 4, seed=5), unit(6, 4, seed=6)
    assert torch.equal(ClipLoss()(image, text, 5.0), ClipLoss()(image, text, 5.0, None))


@pytest.mark.parametrize("cache_labels", [False, True])
def test_cache_labels_does_not_change_results_across_batch_sizes(cache_labels):
    # open_clip caches labels by batch size; a stale cache must not leak into a different batch size.
    loss_fn = ClipLoss(cache_labels=cache_labels)
    atol, rtol = TOLERANCES[torch.float32]
    for n, seed in ((8, 1), (5, 2), (8, 3)):
        image, text = unit(n, 4, seed=seed), unit(n, 4, seed=seed + 10)
        assert_close(
            f"loss N={n}",
            loss_fn(image, text, 7.0),
            reference.clip_loss_reference(image, text, 7.0),
            atol,
            rtol,
        )


def _coca_inputs(n, d, seq=7, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    logits = torch.randn(n, seq, vocab, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (n, seq), generator=g)
    labels[:, -2:] = 0  # padding, ignored with pad_id=0
    return image, text, logits, labels, torch.tensor(14.3, requires_grad=True)


@pytest.mark.parametrize("n", [1, 17, 130])
def test_coca_loss_matches_open_clip(n):
    image, text, logits, labels, scale = _coca_inputs(n, 24)
    clip_part, caption_part = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.5, backend="torch")(
        image, text, logits, labels, scale
    )
    grads = torch.autograd.grad(clip_part + caption_part, (image, text, logits, scale))
    ref_leaves = [t.detach().clone().requires_grad_() for t in (image, text, logits, scale)]
    ref_clip = 1.5 * reference.clip_loss_reference(ref_leaves[0], ref_leaves[1], ref_leaves[3])
    ref_caption = 2.0 * reference.caption_loss_reference(ref_leaves[2], labels, pad_id=0)
    ref_grads = torch.autograd.grad(ref_clip + ref_caption, ref_leaves)
    atol, rtol = TOLERANCES[torch.float32]
    assert_close("contrastive_loss", clip_part, ref_clip, atol=atol, rtol=rtol)
    assert_close("caption_loss", caption_part, ref_caption, atol=atol, rtol=rtol)
    for name, grad, ref in zip(("image", "text", "logits", "scale"), grads, ref_grads):
        assert_close(f"d{name}", grad, ref, atol=atol, rtol=rtol)


def test_coca_loss_zero_clip_weight_does_no_contrastive_work():
    image, text, logits, labels, scale = _coca_inputs(5, 8)
    loss_fn = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0, backend="torch")
    with TensorSizeRecorder() as recorder:
        out = loss_fn(image, text, logits, labels, scale, output_dict=True)
    assert set(out) == {"contrastive_loss", "caption_loss"}
    assert torch.equal(out["contrastive_loss"], torch.tensor(0)), out["contrastive_loss"]
    assert not any("mm" in op for _, op in recorder.created), "no similarity GEMM may run"


def test_coca_loss_pad_id_is_ignored_like_open_clip():
    image, text, logits, labels, scale = _coca_inputs(4, 8)
    labels[:, 0] = 3
    _, caption = CoCaLoss(1.0, 1.0, pad_id=3, backend="torch")(image, text, logits, labels, scale)
    expected = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=3)
    assert_close("caption_loss", caption, expected, atol=0.0)


def test_coca_loss_bad_inputs_are_clear_errors():
    image, text, logits, labels, scale = _coca_inputs(4, 8)
    with pytest.raises(ValueError, match="`logits` must be a \\[batch, seq_len, vocab\\]"):
        CoCaLoss(1.0, 1.0)(image, text, logits[0], labels, scale)
    with pytest.raises(ValueError, match="`labels` must be a \\[batch, seq_len\\]"):
        CoCaLoss(1.0, 1.0)(image, text, logits, labels[:, :3], scale)
    with pytest.raises(TypeError, match="`caption_loss_weight` must be a number"):
        CoCaLoss("2", 1.0)
    with pytest.raises(TypeError, match="`pad_id` must be an int"):
        CoCaLoss(1.0, 1.0, pad_id=0.5)
    with pytest.raises(ValueError, match="use_horovod"):
        CoCaLoss(1.0, 1.0, use_horovod=True)
