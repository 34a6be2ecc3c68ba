"""``patch_open_clip``: open_clip's own lookups build fastcontrast losses, with open_clip's values, and undo."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch

import fastcontrast
from fastcontrast.integrations import patch_open_clip

pytest.importorskip("open_clip")
params = pytest.importorskip("open_clip_train.params", reason="open_clip's training extras are missing")

import open_clip  # noqa: E402
import open_clip.factory  # noqa: E402
import open_clip.loss  # noqa: E402

NAMES = ("ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss")
ORIGINALS = {name: getattr(open_clip.loss, name) for name in NAMES}


def bindings():
    """Every place open_clip looks the loss classes up, and what is bound there now."""
    modules = (open_clip.loss, open_clip.factory, open_clip)
    return {f"{m.__name__}.{name}": getattr(m, name) for m in modules for name in NAMES if hasattr(m, name)}


@pytest.fixture(autouse=True)
def open_clip_restored():
    before = bindings()
    yield
    assert bindings() == before, "a test left open_clip patched"


def trainer_args(*argv: str, distill: bool = False):
    """open_clip_train's parsed arguments, completed the way its main() completes them before create_loss."""
    args = params.parse_args(list(argv))
    args.distill, args.rank, args.world_size = distill, 0, 1
    return args


CREATE_LOSS_CASES = {
    "clip": ((), {}, "ClipLoss"),
    "siglip": (("--siglip",), {}, "SigLipLoss"),
    "coca": (("--model", "coca_ViT-B-32"), {}, "CoCaLoss"),
    "distill": ((), {"distill": True}, "DistillClipLoss"),
}


@pytest.mark.parametrize("case", list(CREATE_LOSS_CASES))
def test_create_loss_builds_fastcontrasts_class_while_patched_and_open_clips_after_undo(case):
    argv, extra, name = CREATE_LOSS_CASES[case]
    args = trainer_args(*argv, **extra)
    handle = patch_open_clip()
    try:
        assert type(open_clip.factory.create_loss(args)) is getattr(fastcontrast, name)
    finally:
        handle.undo()
    assert type(open_clip.factory.create_loss(args)) is ORIGINALS[name]


def test_patch_rebinds_the_loss_module_the_factory_and_the_top_level_package():
    with patch_open_clip() as handle:
        for where, cls in bindings().items():
            assert cls is getattr(fastcontrast, where.rsplit(".", 1)[1]), where
        assert {"open_clip.factory.ClipLoss", "open_clip.loss.SigLipLoss", "open_clip.ClipLoss"} <= set(handle.patched)
    assert bindings()["open_clip.factory.ClipLoss"] is ORIGINALS["ClipLoss"]


def test_undo_is_idempotent_and_the_context_manager_undoes_after_an_error():
    handle = patch_open_clip()
    assert handle.active
    handle.undo()
    handle.undo()
    assert not handle.active
    assert open_clip.loss.ClipLoss is ORIGINALS["ClipLoss"]
    with pytest.raises(RuntimeError, match="inside"):
        with patch_open_clip():
            assert open_clip.factory.ClipLoss is fastcontrast.ClipLoss
            raise RuntimeError("inside the block")
    assert open_clip.factory.ClipLoss is ORIGINALS["ClipLoss"]


def test_nested_patches_undone_in_reverse_order_restore_open_clip():
    with patch_open_clip(backend="torch"):
        with patch_open_clip(chunk_bytes=1024):
            assert open_clip.loss.ClipLoss().chunk_bytes == 1024
        assert open_clip.loss.ClipLoss().backend == "torch"
    assert open_clip.loss.ClipLoss is ORIGINALS["ClipLoss"]


def test_undo_out_of_order_leaves_the_newer_patch_and_warns():
    outer = patch_open_clip(backend="torch")
    inner = patch_open_clip(backend="reference")
    with pytest.warns(RuntimeWarning, match="rebound after this open_clip patch"):
        outer.undo()
    assert open_clip.loss.ClipLoss().backend == "reference"
    inner.undo()  # puts back the outer patch's classes, which the user then removes by hand here
    for module, name, original in [(m, n, ORIGINALS[n]) for m in (open_clip.loss, open_clip.factory, open_clip)
                                   for n in NAMES if hasattr(m, n)]:
        setattr(module, name, original)


def test_options_become_constructor_defaults_and_explicit_arguments_win():
    with patch_open_clip(backend="torch", chunk_bytes=4096):
        loss = open_clip.factory.create_loss(trainer_args("--local-loss", "--gather-with-grad"))
        assert isinstance(loss, fastcontrast.ClipLoss)
        assert (loss.backend, loss.chunk_bytes, loss.local_loss, loss.gather_with_grad) == ("torch", 4096, True, True)
        explicit = open_clip.loss.SigLipLoss(backend="reference", chunk_bytes=None)
        assert (explicit.backend, explicit.chunk_bytes) == ("reference", None)
        cls = open_clip.loss.CoCaLoss
        assert (cls.__name__, cls.__qualname__, cls.__module__) == ("CoCaLoss", "CoCaLoss", "fastcontrast.losses")
        assert cls(caption_loss_weight=2.0, clip_loss_weight=1.0).chunk_bytes == 4096


def test_a_configured_loss_pickles_as_the_plain_fastcontrast_class_with_its_options():
    with patch_open_clip(backend="torch", chunk_bytes=4096):
        loss = open_clip.loss.ClipLoss(local_loss=True)
    restored = pickle.loads(pickle.dumps(loss))
    assert type(restored) is fastcontrast.ClipLoss
    assert (restored.backend, restored.chunk_bytes, restored.local_loss) == ("torch", 4096, True)


@pytest.mark.parametrize(
    "kwargs, error", [({"backend": "cuda"}, "backend"), ({"chunk_bytes": 0}, "chunk_bytes"),
                      ({"chunk_bytes": 1.5}, "chunk_bytes")],
    ids=["unknown-backend", "zero-chunk-bytes", "float-chunk-bytes"],
)
def test_bad_options_fail_at_patch_time_and_patch_nothing(kwargs, error):
    with pytest.raises(ValueError, match=error):
        patch_open_clip(**kwargs)


def features(n: int, d: int, seed: int, requires_grad: bool = True):
    """Unit-norm rows, as open_clip's models hand the loss (with a scale of 8, logits lie within ±8)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(requires_grad)


def run_loss(cls, name: str, seed: int):
    """One forward + backward of ``cls`` on the same random inputs; returns outputs and input gradients."""
    image, text = features(12, 16, seed), features(12, 16, seed + 1)
    scale = torch.tensor(8.0, requires_grad=True)
    inputs = [image, text, scale]
    if name == "ClipLoss":
        out = cls()(image, text, scale)
    elif name == "SigLipLoss":
        bias = torch.tensor(-3.0, requires_grad=True)
        inputs.append(bias)
        out = cls()(image, text, scale, bias)
    elif name == "CoCaLoss":
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(12, 5, 30, generator=g, requires_grad=True)
        labels = torch.randint(0, 30, (12, 5), generator=g)
        inputs.append(logits)
        out = cls(caption_loss_weight=2.0, clip_loss_weight=1.0)(image, text, logits, labels, scale, output_dict=True)
    else:
        teacher_image, teacher_text = features(12, 24, seed + 2, False), features(12, 24, seed + 3, False)
        out = cls()(image, text, scale, teacher_image, teacher_text, torch.tensor(5.0), output_dict=True)
    terms = out if isinstance(out, dict) else {"loss": out}
    sum(terms.values()).backward()
    return {k: v.detach() for k, v in terms.items()}, [t.grad for t in inputs]


@pytest.mark.parametrize("name", NAMES)
def test_patched_losses_give_open_clips_values_and_gradients(name):
    expected, expected_grads = run_loss(ORIGINALS[name], name, seed=3)
    with patch_open_clip():
        patched = getattr(open_clip.loss, name)
        assert patched is getattr(fastcontrast, name)
        got, grads = run_loss(patched, name, seed=3)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key].float(), rtol=1e-5, atol=1e-6, msg=key)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_no_warning_is_emitted_by_a_plain_patch_and_undo():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_open_clip().undo()


def test_a_configured_clip_loss_still_takes_return_accuracy():
    with patch_open_clip(backend="torch"):
        assert open_clip.loss.ClipLoss(return_accuracy=True).return_accuracy
