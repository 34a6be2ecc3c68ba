"""``fastcontrast.GradCache`` against the plain full-batch step, for every loss family, in fp64.

Two tiny towers with dropout (or one shared tower for the single-tower losses) train for 3 SGD steps at batch
64, once with ``GradCache(chunk_size=8)`` and once with a plain step: forward with grad, loss, ``backward()``.
The plain step's forward runs the same 8-row chunks in the same order, so that it draws the same dropout
masks from the RNG stream (one monolithic forward would draw other masks: a different random function, not a
different gradient); a separate test without randomness uses one monolithic forward. Every step's gradients
(logit scale and bias included) and the final parameters must agree to 1e-10 relative.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import pytest
import torch
from torch import nn

import fastcontrast
from fastcontrast import cached

IN_DIM, HIDDEN, DIM, TEACHER_DIM = 12, 16, 8, 6
BATCH, CHUNK, STEPS = 64, 8, 3
RELATIVE = 1e-10


class Tower(nn.Module):
    def __init__(self, dropout: float = 0.25):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Dropout(dropout), nn.Linear(HIDDEN, DIM))

    def forward(self, x):
        return self.net(x)


class TwoTowers(nn.Module):
    def __init__(self, dropout: float = 0.25):
        super().__init__()
        self.image = Tower(dropout)
        self.text = Tower(dropout)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))


# family: (loss, single tower?, extra arguments of the loss after the embeddings)
FAMILIES = {
    "clip": (lambda: fastcontrast.ClipLoss(backend="torch"), False, "scale_bias"),
    "siglip": (lambda: fastcontrast.SigLipLoss(backend="torch"), False, "scale_bias"),
    "distill": (lambda: fastcontrast.DistillClipLoss(backend="torch"), False, "teacher"),
    "ntxent": (lambda: fastcontrast.NTXentLoss(temperature=0.3, backend="torch"), True, None),
    "dcl": (lambda: fastcontrast.DCLLoss(temperature=0.3, backend="torch"), True, None),
    "dclw": (lambda: fastcontrast.DCLWLoss(temperature=0.3, sigma=0.5, backend="torch"), True, None),
    "supcon": (lambda: fastcontrast.SupConLoss(temperature=0.2, backend="torch"), True, "labels"),
}


def batch(family: str, step: int):
    """Step ``step``'s inputs and the loss's non-parameter arguments (teacher features, labels)."""
    g = torch.Generator().manual_seed(100 + step)
    x0 = torch.randn(BATCH, IN_DIM, generator=g, dtype=torch.float64)
    x1 = x0 + 0.5 * torch.randn(BATCH, IN_DIM, generator=g, dtype=torch.float64)
    teacher = [torch.nn.functional.normalize(torch.randn(BATCH, TEACHER_DIM, generator=g, dtype=torch.float64), dim=1)
               for _ in range(2)]
    labels = torch.randint(0, 6, (BATCH,), generator=g)
    _, single, extra = FAMILIES[family]
    inputs = [x0] if extra == "labels" else [x0, x1]
    return inputs, {"teacher": teacher, "labels": labels}


def encoders_and_args(family: str, model: TwoTowers, data: dict):
    """The encoders (one per input) and the loss's arguments after the embeddings, built from the model."""
    _, single, extra = FAMILIES[family]
    encoders = [model.image, model.image] if single else [model.image, model.text]
    if extra == "labels":
        encoders = [model.image]
    if extra == "scale_bias":
        args = (model.logit_scale.exp(), model.logit_bias)
    elif extra == "teacher":
        args = (model.logit_scale.exp(), *data["teacher"], torch.tensor(10.0, dtype=torch.float64))
    elif extra == "labels":
        args = (data["labels"],)
    else:
        args = ()
    return encoders, args


def plain_step(encoders, inputs, loss_fn, args, chunk=CHUNK):
    """The full-batch step: forward with grad (in ``chunk``-row pieces, for the same dropout draws), loss,
    backward of the summed terms."""
    embeddings = [torch.cat([encoder(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
                  for encoder, x in zip(encoders, inputs)]
    output = loss_fn(*embeddings, *args)
    total = cached.total_loss(output)
    total.backward()
    return total.detach()


def train(family: str, use_cache: bool, *, dropout: float = 0.25, reference_chunk: int = CHUNK):
    """Three SGD steps; returns per step the loss and every parameter's gradient, and the final parameters."""
    loss_factory, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = TwoTowers(dropout).double()
    loss_fn = loss_factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    torch.manual_seed(1234)  # the dropout stream: the same for both runs
    history = []
    for step in range(STEPS):
        inputs, data = batch(family, step)
        encoders, args = encoders_and_args(family, model, data)
        optimizer.zero_grad()
        if use_cache:
            output = fastcontrast.GradCache(encoders, loss_fn, chunk_size=CHUNK).step(*inputs, loss_args=args)
            loss = sum(output) if isinstance(output, tuple) else output  # distill: (contrastive, distill)
        else:
            loss = plain_step(encoders, inputs, loss_fn, args, chunk=reference_chunk)
        history.append((loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None}))
        optimizer.step()
    return history, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_relative(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float = RELATIVE) -> None:
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rtol * max(scale, 1e-30), (
        f"{name}: max abs error {error:.3e} > {rtol:.0e} × max |expected| {scale:.3e}"
    )


def assert_same_training(cached_run, plain_run) -> None:
    (cached_history, cached_params), (plain_history, plain_params) = cached_run, plain_run
    for step, ((loss_c, grads_c), (loss_p, grads_p)) in enumerate(zip(cached_history, plain_history)):
        assert_relative(f"step {step} loss", loss_c, loss_p)
        assert grads_c.keys() == grads_p.keys(), f"step {step}: parameters with .grad differ"
        for name in grads_p:
            assert_relative(f"step {step} {name}.grad", grads_c[name], grads_p[name])
    for name in plain_params:
        assert_relative(f"parameter {name} after {STEPS} steps", cached_params[name], plain_params[name])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_steps_match_full_batch_steps_with_dropout_in_fp64(family):
    assert_same_training(train(family, use_cache=True), train(family, use_cache=False))


def test_cached_step_matches_one_monolithic_forward_without_randomness():
    # No dropout: the chunked forward and one forward over all 64 rows are the same function.
    assert_same_training(train("clip", use_cache=True, dropout=0.0),
                         train("clip", use_cache=False, dropout=0.0, reference_chunk=BATCH))


def test_without_rng_replay_the_dropout_masks_differ_and_the_gradients_are_wrong(monkeypatch):
    # The equality test above must be able to fail: replaying nothing re-draws other dropout masks.
    monkeypatch.setattr(cached._RngState, "replayed", lambda self: contextlib.nullcontext())
    with pytest.raises(AssertionError, match="grad"):
        assert_same_training(train("clip", use_cache=True), train("clip", use_cache=False))


def test_step_accumulates_into_existing_grad_as_backward_does():
    torch.manual_seed(0)
    model = TwoTowers().double()
    inputs, data = batch("clip", 0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.125)
    torch.manual_seed(5)
    encoders, args = encoders_and_args("clip", model, data)
    fastcontrast.GradCache(encoders, fastcontrast.ClipLoss(backend="torch"), CHUNK).step(*inputs, loss_args=args)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    encoders, args = encoders_and_args("clip", model, data)
    plain_step(encoders, inputs, fastcontrast.ClipLoss(backend="torch"), args)
    for name, p in model.named_parameters():
        assert_relative(f"{name}.grad", accumulated[name], p.grad + 0.125)


def test_rng_stream_after_a_cached_step_is_where_the_plain_step_leaves_it():
    results = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        model = TwoTowers().double()
        inputs, data = batch("clip", 0)
        torch.manual_seed(9)
        encoders, args = encoders_and_args("clip", model, data)
        loss_fn = fastcontrast.ClipLoss(backend="torch")
        if use_cache:
            fastcontrast.GradCache(encoders, loss_fn, CHUNK).step(*inputs, loss_args=args)
        else:
            plain_step(encoders, inputs, loss_fn, args)
        results.append(torch.rand(4))
    assert torch.equal(*results), f"next draws differ: cached {results[0]} vs plain {results[1]}"


def test_grad_scaler_scale_is_carried_by_the_cached_gradients_and_steps_like_plain():
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        model = TwoTowers().double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        loss_fn = fastcontrast.SigLipLoss(backend="torch")
        torch.manual_seed(3)
        inputs, data = batch("siglip", 0)
        encoders, args = encoders_and_args("siglip", model, data)
        if use_cache:
            fastcontrast.GradCache(encoders, loss_fn, CHUNK, scaler=scaler).step(*inputs, loss_args=args)
        else:
            embeddings = [torch.cat([e(x[i:i + CHUNK]) for i in range(0, BATCH, CHUNK)])
                          for e, x in zip(encoders, inputs)]
            scaler.scale(loss_fn(*embeddings, *args)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        scaler.step(optimizer)
        scaler.update()
        runs.append((grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (grads_c, params_c), (grads_p, params_p) = runs
    for name in grads_p:
        assert_relative(f"scaled {name}.grad", grads_c[name], grads_p[name])
        assert_relative(f"{name} after scaler.step", params_c[name], params_p[name])
    # The scale is in .grad (1024 × the unscaled gradient), so scaler.step must unscale it.
    assert grads_p["logit_bias"].abs().item() > 1.0


def test_loss_output_is_returned_detached_in_the_losss_own_structure():
    torch.manual_seed(0)
    model = TwoTowers().double()
    inputs, data = batch("distill", 0)
    encoders, args = encoders_and_args("distill", model, data)
    output = fastcontrast.GradCache(encoders, fastcontrast.DistillClipLoss(backend="torch"), CHUNK).step(
        *inputs, loss_args=args)
    assert isinstance(output, tuple) and len(output) == 2
    assert not any(t.requires_grad for t in output)


@pytest.mark.parametrize("mode", ["warn", "strict", "eval"])
def test_batch_norm_in_training_mode_warns_or_raises_under_strict(mode):
    encoder = nn.Sequential(nn.Linear(IN_DIM, DIM), nn.BatchNorm1d(DIM)).double()
    if mode == "eval":
        encoder.eval()
    cache = fastcontrast.GradCache([encoder, encoder], fastcontrast.NTXentLoss(backend="torch"), CHUNK,
                                   strict=mode == "strict")
    inputs, _ = batch("ntxent", 0)
    if mode == "strict":
        with pytest.raises(ValueError, match="BatchNorm1d.*per-chunk statistics.*strict=True"):
            cache.step(*inputs)
        assert all(p.grad is None for p in encoder.parameters())
    elif mode == "warn":
        with pytest.warns(UserWarning, match="BatchNorm1d in training mode"):
            cache.step(*inputs)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cache.step(*inputs)


@pytest.mark.parametrize("chunk_size, error", [(0, ValueError), (-4, ValueError), (2.5, TypeError),
                                               (True, TypeError), ("8", TypeError)])
def test_chunk_size_below_one_or_not_an_int_is_an_error_naming_chunk_size(chunk_size, error):
    with pytest.raises(error, match="`chunk_size`"):
        fastcontrast.GradCache(Tower().double(), fastcontrast.NTXentLoss(), chunk_size)


@pytest.mark.parametrize(
    "bad_output, error, match",
    [
        pytest.param(lambda x: x[:1], ValueError, r"encoder 1 \(.*\) returned .* shape \(1, 12\) for a chunk of 8",
                     id="wrong-rows"),
        pytest.param(lambda x: x.long(), ValueError, r"encoder 1 .*torch.int64", id="integer-tensor"),
        pytest.param(lambda x: {"features": x}, TypeError, r"encoder 1 .*returned dict", id="dict"),
        pytest.param(lambda x: (x, "cls"), TypeError, r"encoder 1 .*output 1 returned str", id="tuple-with-string"),
    ],
)
def test_an_encoder_returning_the_wrong_type_or_shape_is_an_error_naming_the_encoder(bad_output, error, match):
    inputs, _ = batch("clip", 0)
    cache = fastcontrast.GradCache([Tower().double(), bad_output], fastcontrast.ClipLoss(backend="torch"), CHUNK)
    with pytest.raises(error, match=match):
        cache.step(*inputs, loss_args=(torch.tensor(5.0, dtype=torch.float64),))


@pytest.mark.parametrize(
    "later_chunk, match",
    [
        pytest.param(lambda x: x.float(), r"\('torch.float32', \(12,\)\)\] for rows 8:16 but \[\('torch.float64'",
                     id="dtype"),
        pytest.param(lambda x: x[:, :5], r"\(5,\)\)\] for rows 8:16 but \[\('torch.float64', \(12,\)\)\] for rows 0:8",
                     id="width"),
    ],
)
def test_an_encoder_whose_chunks_disagree_in_dtype_or_width_is_an_error_naming_the_encoder(later_chunk, match):
    calls = []

    def tower(x):
        calls.append(x)
        return x if len(calls) == 1 else later_chunk(x)

    with pytest.raises(ValueError, match=r"encoder 0 \(.*tower\) returned embeddings .*" + match):
        cached.ChunkedForward([tower], [torch.randn(BATCH, IN_DIM, dtype=torch.float64)], CHUNK)


def test_the_embedding_pass_holds_the_batch_of_embeddings_once():
    # Each chunk's output is copied into the [N, d] leaf as it comes and freed: live tensor storage peaks at
    # the embeddings, the chunks' RNG states (5 KiB each on CPU) and one chunk's forward (measured: 2 chunk
    # outputs), where a list of chunks and their torch.cat would hold the embeddings twice (2 MiB here).
    from fastcontrast.tools.bench import MemoryMeter

    rows, width, chunk = 4096, 64, 256
    inputs = torch.randn(rows, width)
    forward, peak = MemoryMeter(torch.device("cpu"), prefer="tensor_bytes").measure(
        lambda: cached.ChunkedForward([lambda x: x * 2.0], [inputs], chunk)
    )
    torch.testing.assert_close(forward.embeddings[0], inputs * 2.0, rtol=0, atol=0)
    embedding_bytes, chunk_bytes, rng_bytes = rows * width * 4, chunk * width * 4, rows // chunk * 8 * 2**10
    bound = embedding_bytes + rng_bytes + 2 * chunk_bytes + 64 * 2**10
    assert peak <= bound, (
        f"embedding pass peak {peak} B of live tensors; bound {bound} B = embeddings {embedding_bytes} + RNG "
        f"states {rng_bytes} + 2 chunks {2 * chunk_bytes} + 64 KiB"
    )


def test_encoder_count_must_match_the_inputs():
    cache = fastcontrast.GradCache([Tower().double()] * 3, fastcontrast.ClipLoss(backend="torch"), CHUNK)
    with pytest.raises(ValueError, match="one callable per input \\(2\\), got 3"):
        cache.step(*batch("clip", 0)[0], loss_args=(5.0,))


class FailsOnCall:
    """A tower whose ``fail_at``-th call with grad enabled raises (a re-forward that runs out of memory)."""

    def __init__(self, fail_at: int):
        self.tower, self.fail_at, self.grad_calls = Tower().double(), fail_at, 0

    def __call__(self, x):
        if torch.is_grad_enabled():
            self.grad_calls += 1
            if self.grad_calls == self.fail_at:
                raise MemoryError("simulated out of memory in the re-forward")
        return self.tower(x)


def test_an_error_in_a_re_forward_says_the_gradients_are_partial_and_chains_the_cause():
    tower = FailsOnCall(fail_at=3)
    inputs, _ = batch("ntxent", 0)
    cache = fastcontrast.GradCache(tower, fastcontrast.NTXentLoss(backend="torch"), CHUNK)
    with pytest.raises(fastcontrast.PartialGradientError, match=r"partial \(2 of 16 chunks.*zero them") as info:
        cache.step(*inputs)
    assert isinstance(info.value.__cause__, MemoryError)
    assert "simulated out of memory" in str(info.value)
    # Indeed partial: two chunks' gradients are in .grad.
    assert all(p.grad is not None for p in tower.tower.parameters())


def test_an_error_in_the_embedding_pass_propagates_unchanged_and_leaves_grad_untouched():
    def broken(x):
        raise KeyError("no such feature")

    tower = Tower().double()
    cache = fastcontrast.GradCache([tower, broken], fastcontrast.ClipLoss(backend="torch"), CHUNK)
    with pytest.raises(KeyError, match="no such feature"):
        cache.step(*batch("clip", 0)[0], loss_args=(5.0,))
    assert all(p.grad is None for p in tower.parameters())


def test_a_loss_without_any_gradient_is_an_error():
    tower = Tower().double().requires_grad_(False)
    cache = fastcontrast.GradCache(tower, fastcontrast.NTXentLoss(backend="torch"), CHUNK)
    with pytest.raises(ValueError, match="no encoder output and no extra argument of the loss requires grad"):
        cache.step(*batch("ntxent", 0)[0])
    # A loss whose output carries no gradient at all.
    cache = fastcontrast.GradCache(Tower().double(), lambda a, b: {"accuracy": (a @ b.T).argmax(1).float().mean()},
                                   CHUNK)
    with pytest.raises(ValueError, match="does not depend on any embedding"):
        cache.step(*batch("ntxent", 0)[0])


def test_mapping_and_tuple_inputs_are_chunked_per_tensor():
    # A mapping is the encoder's one argument (tokenizer features); a tuple its positional arguments.
    torch.manual_seed(0)
    model = TwoTowers(dropout=0.0).double()
    inputs, _ = batch("clip", 0)
    scale = torch.tensor(4.0, dtype=torch.float64)
    mask = torch.ones(BATCH, 1, dtype=torch.float64)
    encoders = [lambda features: model.image(features["x"] * features["mask"]),
                lambda x, weight: model.text(x) * weight]
    fastcontrast.GradCache(encoders, fastcontrast.ClipLoss(backend="torch"), 5).step(
        {"x": inputs[0], "mask": mask, "name": "not a tensor"}, (inputs[1], 2.0), loss_args=(scale,))
    cached_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    fastcontrast.ClipLoss(backend="torch")(model.image(inputs[0]), model.text(inputs[1]) * 2.0, scale).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_relative(f"{name}.grad", cached_grads[name], p.grad)


def test_autocast_runs_the_embedding_pass_re_forward_and_loss_in_bf16_like_the_plain_step():
    # CPU bf16 autocast, fp32 parameters. Both steps run the same bf16 matmuls on the same chunks, so the loss
    # sees the same bf16 embeddings: the loss and logit_scale's gradient agree exactly (without autocast in
    # the embedding pass they differ by ~5e-3). The encoders' gradients differ where bf16 embedding gradients
    # are summed (one backward vs one per chunk): bf16 rounding, measured up to 7e-3.
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        model = TwoTowers().float()
        inputs = [x.float() for x in batch("clip", 0)[0]]
        clip = fastcontrast.ClipLoss(backend="torch")
        dtypes = []

        def loss_fn(image, text, *args, clip=clip, dtypes=dtypes):
            dtypes.append((image.dtype, text.dtype))
            return clip(image, text, *args)

        torch.manual_seed(7)
        with autocast():
            args = (model.logit_scale.exp(), model.logit_bias)
        if use_cache:
            loss = fastcontrast.GradCache([model.image, model.text], loss_fn, CHUNK, autocast=autocast).step(
                *inputs, loss_args=args)
        else:
            with autocast():
                loss = plain_step([model.image, model.text], inputs, loss_fn, args)
        assert dtypes == [(torch.bfloat16, torch.bfloat16)], f"embeddings reached the loss as {dtypes}"
        runs.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_c, grads_c), (loss_p, grads_p) = runs
    assert_relative("bf16-autocast loss", loss_c, loss_p, rtol=1e-6)
    assert_relative("bf16-autocast logit_scale.grad", grads_c["logit_scale"], grads_p["logit_scale"], rtol=1e-6)
    for name in grads_p:
        assert_relative(f"bf16-autocast {name}.grad", grads_c[name], grads_p[name], rtol=2e-2)


def test_chunked_forward_with_a_custom_split_and_defer_backward_gives_the_plain_gradient():
    # Uneven chunks (5, 20, 39 rows) chosen by the caller, as sentence-transformers' token-packed mini-batches
    # are; the loss's backward() runs the re-forward, scaled by the gradient that reaches it (here 0.5).
    tower = Tower(dropout=0.0).double()
    inputs, _ = batch("ntxent", 0)
    loss_fn = fastcontrast.NTXentLoss(temperature=0.3, backend="torch")
    loss_fn(*(tower(x) for x in inputs)).mul(0.5).backward()
    expected = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad(set_to_none=True)

    bounds = [0, 5, 25, BATCH]
    seen = []

    def split(x, chunk_size):
        return [(slice(a, b), x[a:b]) for a, b in zip(bounds, bounds[1:])]

    def progress(chunks, desc):
        seen.append((desc, len(chunks)))
        return chunks

    forward = cached.ChunkedForward(tower, list(inputs), CHUNK, split=split, progress=progress)
    assert [c.rows for c in forward.chunks] == [slice(a, b) for a, b in zip(bounds, bounds[1:])] * 2
    value = loss_fn(*forward.embeddings)
    grads, _ = cached.loss_gradients(value, forward.embeddings, [])
    deferred = forward.defer_backward(value, grads)
    assert deferred.grad_fn is None and deferred.requires_grad and torch.equal(deferred, value.detach())
    assert all(p.grad is None for p in tower.parameters()), "phase 3 ran before backward()"
    (deferred * 0.5).backward()
    for name, (p, want) in zip([n for n, _ in tower.named_parameters()], zip(tower.parameters(), expected)):
        torch.testing.assert_close(p.grad, want, rtol=RELATIVE, atol=0, msg=lambda m, name=name: f"d {name}: {m}")
    assert seen == [("Embedding chunks (no grad)", 6), ("Re-forward and backward", 6)]


@pytest.mark.parametrize("bounds", [[0, 5, 5, 64], [1, 64], [0, 30, 20, 64]], ids=["empty", "gap", "overlap"])
def test_a_split_whose_rows_are_not_contiguous_from_zero_is_an_error_naming_split(bounds):
    inputs, _ = batch("ntxent", 0)
    with pytest.raises(ValueError, match="`split` must return .* non-empty, contiguous slices from 0; for input 0"):
        cached.ChunkedForward(Tower().double(), list(inputs), CHUNK,
                              split=lambda x, size: [(slice(a, b), x[a:b]) for a, b in zip(bounds, bounds[1:])])
