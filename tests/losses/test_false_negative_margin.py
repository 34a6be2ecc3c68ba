"""``false_negative_margin`` on ``ClipLoss`` and ``NTXentLoss`` (an option open_clip and lightly lack): the
blockwise torch engine's masked tiles and the Triton engine's masked kernels (in the interpreter) against the
full-matrix references.

The rule, per row against that row's own positive: candidate c ≠ positive is left out when sim(row, c) >
sim(row, positive) + margin, sim the features' product before the scale (CLIP: I·Tᵀ in each direction;
NT-Xent: the cosine; the memory bank: the query against each bank entry, its own key the positive). Checked
here: gradcheck in fp64, fp32 and bf16 within the dtype tolerances, N = 1, N not a multiple of the chunk, a
margin that masks nothing, a duplicated sample written out by hand, the positive kept under any margin,
bad input, the memory bound and no host sync.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import BOUND, BOUND_N, TOLERANCES, TensorSizeRecorder, assert_close

import fastcontrast
from fastcontrast import _validation, reference
from fastcontrast.losses._masked_lse import false_negative_lse
from fastcontrast.tools.sync_check import HostSyncRecorder

SCALE = 6.0
TEMPERATURE = 0.2
BANK = 11
LOSSES = ("clip", "clip-bias", "nt_xent", "memory_bank")
MARGINS = (0.0, 0.1, -0.2)


def batch(n, d, dtype=torch.float64, seed=0):
    """Clustered unit features: samples of one cluster score near their positive, so a margin masks some."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(max(1, n // 3), d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, centers.shape[0], (n,), generator=g)
    image = F.normalize(centers[labels] + 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(centers[labels] + 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.cat([centers + 0.6 * torch.randn(centers.shape, generator=g, dtype=torch.float64),
                                  torch.randn(BANK, d, generator=g, dtype=torch.float64)]), dim=1)
    return image.to(dtype), text.to(dtype), bank.float()


def rows_per_chunk(rows, columns, dtype):
    """chunk_bytes that give ``rows`` rows per chunk of the masked LSE (two tiles of the compute dtype)."""
    return rows * 2 * columns * (8 if dtype == torch.float64 else 4)


def run(loss, a, b, bank, margin, *, backend="torch", chunk_rows=3, scale=None):
    """(loss, grads of a, b and the scale) of one loss kind, fastcontrast's or the reference's."""
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    n = a.shape[0]
    if loss.startswith("clip"):
        scale = torch.tensor(SCALE, dtype=torch.float32 if a.dtype != torch.float64 else a.dtype,
                             requires_grad=True) if scale is None else scale
        bias = torch.tensor(-1.5, requires_grad=True) if loss == "clip-bias" else None
        if backend == "reference":
            value = reference.clip_loss_reference(a, b, scale, bias, false_negative_margin=margin)
        else:
            value = fastcontrast.ClipLoss(backend=backend, chunk_bytes=rows_per_chunk(chunk_rows, n, a.dtype),
                                          false_negative_margin=margin)(a, b, scale, bias)
        inputs = [a, b, scale]
    elif loss == "nt_xent":
        if backend == "reference":
            value = reference.nt_xent_loss_reference(a, b, TEMPERATURE, false_negative_margin=margin)
        else:
            value = fastcontrast.NTXentLoss(TEMPERATURE, backend=backend, false_negative_margin=margin,
                                            chunk_bytes=rows_per_chunk(chunk_rows, 2 * n, a.dtype))(a, b)
        inputs = [a, b]
    else:
        if backend == "reference":
            value = reference.nt_xent_memory_bank_loss_reference(a, b, bank, TEMPERATURE,
                                                                 false_negative_margin=margin)
        else:
            value = fastcontrast.nt_xent_memory_bank_loss(
                a, b, bank, TEMPERATURE, backend=backend, false_negative_margin=margin,
                chunk_bytes=rows_per_chunk(chunk_rows, bank.shape[0], a.dtype))
        inputs = [a, b]
    return value.detach(), torch.autograd.grad(value, inputs)


def assert_matches(got, expected, atol, rtol, what):
    (value, grads), (expected_value, expected_grads) = got, expected
    assert_close(f"{what}: loss", value, expected_value, atol, rtol)
    for name, grad, expected_grad in zip(("d a", "d b", "d scale"), grads, expected_grads):
        assert_close(f"{what}: {name}", grad, expected_grad, atol, rtol)


def masked_count(loss, a, b, bank, margin):
    """How many candidates the rule leaves out (on the reference's full similarity matrices)."""
    a, b = a.double(), b.double()
    if loss == "memory_bank":
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        return int((a @ bank.double().T > (a * b).sum(1, keepdim=True) + margin).sum())
    if loss == "nt_xent":
        z = F.normalize(torch.cat([a, b]), dim=1)
        n = a.shape[0]
        sim = z @ z.T
        positive = sim.diagonal(n)
        positive = torch.cat([positive, positive]).unsqueeze(1)
        dropped = sim > positive + margin
        dropped.fill_diagonal_(False)
        return int(dropped.sum()) - int(dropped.diagonal(n).sum() + dropped.diagonal(-n).sum())
    sim = a @ b.T
    dropped = (sim > sim.diagonal().unsqueeze(1) + margin) | (sim > sim.diagonal().unsqueeze(0) + margin)
    return int(dropped.sum()) - int(dropped.diagonal().sum())


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_engine_passes_gradcheck_in_fp64(loss):
    image, text, bank = batch(5, 4, seed=1)
    margin = 0.05
    assert masked_count(loss, image, text, bank, margin) > 0, "nothing masked: gradcheck would not see the mask"
    bank = bank.double()
    chunk = dict(chunk_bytes=rows_per_chunk(2, 10, torch.float64))
    if loss.startswith("clip"):
        bias = torch.tensor(0.3, dtype=torch.float64, requires_grad=True) if loss == "clip-bias" else None

        def fn(a, b, s):
            return fastcontrast.clip_loss(a, b, s, bias, false_negative_margin=margin, **chunk)

        inputs = (image, text, torch.tensor(SCALE, dtype=torch.float64))
    elif loss == "nt_xent":
        def fn(a, b):
            return fastcontrast.nt_xent_loss(a, b, TEMPERATURE, false_negative_margin=margin, **chunk)

        inputs = (image, text)
    else:
        def fn(a, b):
            return fastcontrast.nt_xent_memory_bank_loss(a, b, bank, TEMPERATURE, false_negative_margin=margin,
                                                         **chunk)

        inputs = (image, text)
    inputs = tuple(x.clone().requires_grad_() for x in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


SHAPES = [(1, 3), (7, 48), (20, 48)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, d", SHAPES, ids=[f"N{n}-D{d}" for n, d in SHAPES])
@pytest.mark.parametrize("loss", LOSSES)
def test_torch_engine_matches_the_full_matrix_reference(loss, n, d, dtype):
    image, text, bank = batch(n, d, dtype, seed=n)
    atol, rtol = TOLERANCES[dtype]
    for margin in MARGINS:
        # The reference in fp64 on the same rounded inputs; 3 rows per chunk, so N = 7 and 20 end ragged.
        expected = run(loss, image.double(), text.double(), bank.to(dtype).double(), margin, backend="reference")
        got = run(loss, image, text, bank, margin)
        assert_matches(got, expected, atol, rtol, f"{loss} N={n} d={d} {dtype} margin={margin}")
    if n > 1:
        assert masked_count(loss, image, text, bank, 0.0) > 0, "the batch has nothing to mask at margin 0"


@pytest.mark.parametrize("loss", LOSSES)
def test_margin_that_masks_nothing_gives_the_unmasked_loss(loss):
    image, text, bank = batch(9, 16, seed=3)
    # Cosines lie in [−1, 1], so no candidate exceeds its positive by 3: the rule masks nothing.
    unmasked = run(loss, image, text, bank, None)
    got = run(loss, image, text, bank, 3.0)
    assert_matches(got, unmasked, 1e-13, 1e-13, f"{loss} margin=3 vs no margin")
    # On full matrices the mask is then all False, and the loss the original's bit for bit.
    reference_masked = run(loss, image, text, bank, 3.0, backend="reference")
    reference_unmasked = run(loss, image, text, bank, None, backend="reference")
    assert torch.equal(reference_masked[0], reference_unmasked[0])


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


def test_duplicated_sample_is_masked_in_the_other_samples_row_nt_xent():
    """Sample 1 repeats sample 0 in both views. Row 0 (view 0 of sample 0) sees view 0 of sample 1 at cosine 1,
    above its positive's 0.8 + 0.1, so that candidate leaves its row; view 1 of sample 1 scores the positive's
    0.8 (≤ 0.9) and stays. Likewise in the rows of sample 1 and of the second views. Written out: each of the
    2n = 6 rows' kept candidates (z = [view 0; view 1], row r's positive r ± 3)."""
    out0 = _unit([1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0])
    out1 = _unit([0.8, 0.6, 0.0], [0.8, 0.6, 0.0], [0.0, 0.6, 0.8])
    z = torch.cat([out0, out1])
    kept = {0: [2, 3, 4, 5], 1: [2, 3, 4, 5], 2: [0, 1, 3, 4, 5], 3: [0, 1, 2, 5], 4: [0, 1, 2, 5], 5: [0, 1, 2, 3, 4]}
    positive = {0: 3, 1: 4, 2: 5, 3: 0, 4: 1, 5: 2}
    sim = z @ z.T
    for row, columns in kept.items():
        rule = [c for c in range(6) if c != row and (c == positive[row] or sim[row, c] <= sim[row, positive[row]]
                                                     + 0.1)]
        assert rule == columns, f"row {row}: the hand-written candidates {columns} are not the rule's {rule}"
    expected = torch.stack([torch.logsumexp(sim[r, kept[r]] / TEMPERATURE, 0) - sim[r, positive[r]] / TEMPERATURE
                            for r in range(6)]).mean()
    for backend in ("torch", "reference"):
        got = fastcontrast.nt_xent_loss(out0, out1, TEMPERATURE, false_negative_margin=0.1, backend=backend)
        assert_close(f"NT-Xent with a duplicated sample ({backend})", got, expected, 1e-12)


def test_duplicated_pair_is_masked_in_each_others_rows_clip():
    """Pairs 0 and 1 are the same image and text. With a margin of −0.01 the duplicate's text (scoring exactly
    the positive's similarity) leaves image row 0 and 1, and likewise in the text rows; pair 2 keeps all."""
    image = _unit([1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    text = _unit([0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.0, 0.9, 0.3])
    kept = {0: [0, 2], 1: [1, 2], 2: [0, 1, 2]}
    sim = image @ text.T
    i2t = torch.stack([torch.logsumexp(SCALE * sim[i, kept[i]], 0) - SCALE * sim[i, i] for i in range(3)])
    t2i = torch.stack([torch.logsumexp(SCALE * sim[kept[j], j], 0) - SCALE * sim[j, j] for j in range(3)])
    expected = (i2t.mean() + t2i.mean()) / 2
    for backend in ("torch", "reference"):
        got = fastcontrast.clip_loss(image, text, SCALE, false_negative_margin=-0.01, backend=backend)
        assert_close(f"CLIP with a duplicated pair ({backend})", got, expected, 1e-12)
    unmasked = fastcontrast.clip_loss(image, text, SCALE)
    assert (unmasked - expected).abs() > 0.1, "the mask changed nothing: the test would not see it"


@pytest.mark.parametrize("loss", LOSSES)
def test_positive_is_never_masked_even_with_a_negative_margin(loss):
    """A margin of −5 leaves out every other candidate: each row keeps only its positive, so the loss is exactly
    0 (lse of one logit minus that logit, from the same tile) with zero gradients."""
    image, text, bank = batch(6, 8, seed=5)
    value, grads = run(loss, image, text, bank, -5.0)
    assert value.item() == 0.0, f"{loss}: loss {value.item()!r} with only the positives left"
    for name, grad in zip(("d a", "d b", "d scale"), grads):
        assert_close(f"{loss}: {name}", grad, torch.zeros_like(grad), 0.0)


def test_rule_is_independent_of_the_scale_and_the_positive_is_read_from_its_own_tile():
    image, text, _ = batch(8, 6, seed=2)
    lse_small, pos_small, _ = false_negative_lse(image, text, 1.0, 0.05, positive_offset=0)
    lse_large, pos_large, _ = false_negative_lse(image, text, 40.0, 0.05, positive_offset=0)
    kept = image @ text.T <= (image * text).sum(1, keepdim=True) + 0.05
    kept.fill_diagonal_(True)
    for s, lse, pos in ((1.0, lse_small, pos_small), (40.0, lse_large, pos_large)):
        logits = (s * image @ text.T).masked_fill(~kept, float("-inf"))
        assert_close(f"masked LSE at scale {s}", lse, torch.logsumexp(logits, 1), 1e-12)
        assert_close(f"positive logits at scale {s}", pos, logits.diagonal(), 1e-12)


def test_clip_accuracy_is_taken_from_the_unmasked_similarity():
    image, text, _ = batch(12, 8, seed=4)
    loss = fastcontrast.ClipLoss(return_accuracy=True, false_negative_margin=0.0)
    out = loss(image, text, SCALE, output_dict=True)
    sim = image @ text.T
    target = torch.arange(12)
    assert out["i2t_top1"].item() == (sim.argmax(1) == target).float().mean().item()
    assert out["t2i_top1"].item() == (sim.argmax(0) == target).float().mean().item()
    assert_close("loss with accuracy", out["contrastive_loss"],
                 reference.clip_loss_reference(image, text, SCALE, false_negative_margin=0.0), 1e-12)


def test_auto_backend_takes_the_engine_it_would_take_without_the_option(monkeypatch):
    """"auto" no longer steers the option to the torch engine: with FASTCONTRAST_BACKEND=triton (what "auto" obeys)
    the masked losses run on the Triton kernels."""
    monkeypatch.setenv("FASTCONTRAST_BACKEND", "triton")
    image, text, bank = batch(6, 8, dtype=torch.float32, seed=6)
    for loss in LOSSES:
        expected = run(loss, image.double(), text.double(), bank.double(), 0.1, backend="reference")
        assert_matches(run(loss, image, text, bank, 0.1, backend="auto"), expected, *TOLERANCES[torch.float32],
                       f"{loss} auto")
    with pytest.raises(TypeError, match="float64"):  # so fp64 is refused, as Triton refuses it everywhere
        run("clip", image.double(), text.double(), bank, 0.1, backend="auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, d", SHAPES + [(5, 1000)], ids=[f"N{n}-D{d}" for n, d in SHAPES + [(5, 1000)]])
@pytest.mark.parametrize("loss", LOSSES)
def test_triton_engine_matches_the_full_matrix_reference(loss, n, d, dtype):
    """The Triton engine's masked kernels (in the interpreter): threshold from the kernels' own arithmetic, the
    rule tile beside S in one pass, the dS panels and their GEMMs, against the fp64 reference of the same inputs
    (the torch engine's cases: in half precision the normalised rows are rounded, which moves some similarities
    across a margin-0 threshold in other draws, for both engines alike)."""
    image, text, bank = batch(n, d, dtype, seed=n)
    atol, rtol = TOLERANCES[dtype]
    for margin in MARGINS:
        expected = run(loss, image.double(), text.double(), bank.to(dtype).double(), margin, backend="reference")
        got = run(loss, image, text, bank.to(dtype), margin, backend="triton")
        assert_matches(got, expected, atol, rtol, f"triton {loss} N={n} d={d} {dtype} margin={margin}")


def test_triton_engine_keeps_a_duplicated_pair_at_margin_zero_and_drops_it_below():
    """Pair 1 repeats pair 0 (CLIP): in row 0 text 1 scores exactly the positive's similarity. At margin 0 the
    rule's strict > keeps it (the threshold is the kernels' own arithmetic for that pair, so the tie holds); at
    −1e-3 it leaves rows 0 and 1. Both against the reference."""
    image, text, _ = batch(6, 48, dtype=torch.float32, seed=7)
    image[1], text[1] = image[0], text[0]
    values = []
    for margin in (0.0, -1e-3):
        expected = run("clip", image.double(), text.double(), None, margin, backend="reference")
        got = run("clip", image, text, None, margin, backend="triton")
        assert_matches(got, expected, *TOLERANCES[torch.float32], f"duplicated pair, margin={margin}")
        values.append(got[0])
    assert (values[0] - values[1]).abs() > 1e-3, "the duplicate was left out at margin 0, or kept below it"


BAD_MARGINS = ["0.1", True, float("nan"), float("inf"), [0.1], torch.tensor(0.1)]


@pytest.mark.parametrize("bad", BAD_MARGINS, ids=repr)
def test_bad_margin_is_a_type_error_naming_the_argument(bad):
    image, text, bank = batch(3, 4)
    for build in (
        lambda: fastcontrast.ClipLoss(false_negative_margin=bad),
        lambda: fastcontrast.NTXentLoss(false_negative_margin=bad),
        lambda: fastcontrast.clip_loss(image, text, SCALE, false_negative_margin=bad),
        lambda: fastcontrast.nt_xent_loss(image, text, false_negative_margin=bad),
        lambda: fastcontrast.nt_xent_memory_bank_loss(image, text, bank, false_negative_margin=bad),
    ):
        with pytest.raises(TypeError, match="false_negative_margin"):
            build()


def test_ring_refuses_the_option_and_dcl_does_not_take_it():
    with pytest.raises(ValueError, match="exchange='ring' does not take false_negative_margin"):
        fastcontrast.ClipLoss(local_loss=True, gather_with_grad=True, exchange="ring", false_negative_margin=0.1)
    with pytest.raises(ValueError, match="exchange='ring' does not take false_negative_margin"):
        fastcontrast.NTXentLoss(gather_distributed=True, exchange="ring", false_negative_margin=0.1)
    with pytest.raises(TypeError, match="false_negative_margin"):
        fastcontrast.DCLLoss(false_negative_margin=0.1)


def test_masked_lse_creates_no_tensor_of_a_quarter_of_n_squared():
    n = BOUND_N  # the memory-bound tests' size, default chunk size
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, 16, generator=g).requires_grad_() for _ in range(2))
    scale = torch.tensor(10.0, requires_grad=True)
    with TensorSizeRecorder() as forward:
        lse, positives, _ = false_negative_lse(a, b, scale, 0.1, positive_offset=0)
    with TensorSizeRecorder() as backward:
        (lse - positives).sum().backward()
    for phase, recorder in (("forward", forward), ("backward", backward)):
        numel, op = recorder.largest()
        assert numel < BOUND, f"{phase}: {op} created {numel} elements, bound {BOUND} (N² = {n * n})"


def test_a_step_with_the_option_reads_nothing_back_to_the_host(monkeypatch):
    # As tests/ops/test_no_host_sync.py: the CPU run takes the accelerator's branch of the input checks.
    monkeypatch.setattr(_validation, "values_readable", lambda tensor: False)
    image, text, bank = batch(10, 8, torch.float32)
    image, text = image.requires_grad_(), text.requires_grad_()
    scale = torch.tensor(SCALE, requires_grad=True)
    clip, clip_local = fastcontrast.ClipLoss(false_negative_margin=0.1), fastcontrast.ClipLoss(
        false_negative_margin=0.1, return_accuracy=True)
    ntxent, memory = fastcontrast.NTXentLoss(false_negative_margin=0.1), fastcontrast.NTXentLoss(
        memory_bank_size=(16, 8), false_negative_margin=0.1)
    for name, step in (("ClipLoss", lambda: clip(image, text, scale)),
                       ("ClipLoss(return_accuracy)", lambda: clip_local(image, text, scale)[0]),
                       ("NTXentLoss", lambda: ntxent(image, text)),
                       ("NTXentLoss(memory bank)", lambda: memory(image, text))):
        with HostSyncRecorder() as recorder:
            step().backward()
        assert not recorder.events, f"{name}: " + "; ".join(map(str, recorder.events))
