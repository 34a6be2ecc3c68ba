"""The drop-in contract every loss module shares: signatures and defaults as in the originals (written out
here from open_clip 3.x ``src/open_clip/loss.py`` and lightly 1.6 ``lightly/loss/*``), keyword-only extras,
open_clip's call forms, no parameters or state.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    TOLERANCES,
    assert_close,
)

import fastcontrast
from fastcontrast import ClipLoss, DCLLoss, DCLWLoss, NTXentLoss, SigLipLoss, reference

REQUIRED = inspect.Parameter.empty


# The originals' positional-or-keyword parameters, in order, with their defaults.
def positional_parameters(func) -> list[tuple[str, object]]:
    params = list(inspect.signature(func).parameters.values())
    assert all(p.kind is not inspect.Parameter.VAR_POSITIONAL for p in params), "*args would swallow options"
    return [(p.name, p.default) for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


ORIGINAL_SIGNATURES = {
    "ClipLoss": (
        ClipLoss,
        [
            ("local_loss", False),
            ("gather_with_grad", False),
            ("cache_labels", False),
            ("rank", 0),
            ("world_size", 1),
            ("use_horovod", False),
        ],
        [
            ("image_features", REQUIRED),
            ("text_features", REQUIRED),
            ("logit_scale", REQUIRED),
            ("logit_bias", None),
            ("output_dict", False),
        ],
    ),
    "SigLipLoss": (
        SigLipLoss,
        [("cache_labels", False), ("rank", 0), ("world_size", 1), ("dist_impl", None)],
        [
            ("image_features", REQUIRED),
            ("text_features", REQUIRED),
            ("logit_scale", REQUIRED),
            ("logit_bias", REQUIRED),
            ("output_dict", False),
        ],
    ),
    "NTXentLoss": (
        NTXentLoss,
        [("temperature", 0.5), ("memory_bank_size", 0), ("gather_distributed", False)],
        [("out0", REQUIRED), ("out1", REQUIRED)],
    ),
    "DCLLoss": (
        DCLLoss,
        [("temperature", 0.1), ("weight_fn", None), ("gather_distributed", False)],
        [("out0", REQUIRED), ("out1", REQUIRED)],
    ),
    "DCLWLoss": (
        DCLWLoss,
        [("temperature", 0.1), ("sigma", 0.5), ("gather_distributed", False)],
        [("out0", REQUIRED), ("out1", REQUIRED)],
    ),
}


@pytest.mark.parametrize("name", ORIGINAL_SIGNATURES)
def test_constructor_signature_matches_the_original(name):
    cls, expected_init, _ = ORIGINAL_SIGNATURES[name]
    assert positional_parameters(cls.__init__)[1:] == expected_init  # [0] is self


@pytest.mark.parametrize("name", ORIGINAL_SIGNATURES)
def test_forward_signature_matches_the_original(name):
    cls, _, expected_forward = ORIGINAL_SIGNATURES[name]
    assert positional_parameters(cls.forward)[1:] == expected_forward
    params = inspect.signature(cls.forward).parameters
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in list(params.values())[1:])


@pytest.mark.parametrize("name", ORIGINAL_SIGNATURES)
def test_extra_options_are_keyword_only_with_neutral_defaults(name):
    cls = ORIGINAL_SIGNATURES[name][0]
    params = inspect.signature(cls.__init__).parameters
    for option, default in (("backend", "auto"), ("process_group", None)):
        assert option in params, f"{name} has no `{option}` option"
        assert params[option].kind is inspect.Parameter.KEYWORD_ONLY, f"{name}.{option} is not keyword-only"
        assert params[option].default == default, f"{name}.{option} defaults to {params[option].default!r}"
    # One positional argument past the original ones must not silently become `backend`.
    original_defaults = [default for _, default in ORIGINAL_SIGNATURES[name][1]]
    cls(*original_defaults)
    with pytest.raises(TypeError):
        cls(*original_defaults, "torch")


def test_functional_losses_take_backend_and_chunk_bytes_as_keywords():
    for func in (
        fastcontrast.clip_loss,
        fastcontrast.siglip_loss,
        fastcontrast.nt_xent_loss,
        fastcontrast.nt_xent_memory_bank_loss,
        fastcontrast.dcl_loss,
    ):
        params = inspect.signature(func).parameters
        assert (
            params["backend"].kind is inspect.Parameter.KEYWORD_ONLY and params["backend"].default == "auto"
        )
        assert params["chunk_bytes"].kind is inspect.Parameter.KEYWORD_ONLY


def unit(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)


@pytest.mark.parametrize("name", ["ClipLoss", "SigLipLoss"])
def test_output_dict_returns_contrastive_loss(name):
    loss_fn = getattr(fastcontrast, name)()
    image, text = unit(10, 8, seed=1), unit(10, 8, seed=2)
    plain = loss_fn(image, text, 10.0, -2.0)
    as_dict = loss_fn(image, text, 10.0, -2.0, output_dict=True)
    assert isinstance(as_dict, dict) and list(as_dict) == ["contrastive_loss"]
    assert torch.equal(as_dict["contrastive_loss"], plain)
    assert plain.shape == ()


@pytest.mark.parametrize("name", ["ClipLoss", "SigLipLoss"])
def test_training_loop_keyword_call_works(name):
    # open_clip's train loop: `losses = loss(**model_out, output_dict=True)`, model_out from CLIP.forward.
    image = unit(10, 8, seed=3).requires_grad_()
    text = unit(10, 8, seed=4).requires_grad_()
    log_scale = torch.tensor(2.659, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    model_out = {
        "image_features": image,
        "text_features": text,
        "logit_scale": log_scale.exp(),
        "logit_bias": bias,
    }
    losses = getattr(fastcontrast, name)()(**model_out, output_dict=True)
    total = sum(losses.values())
    total.backward()
    for tensor_name, leaf in (("image", image), ("text", text), ("log_scale", log_scale), ("bias", bias)):
        assert leaf.grad is not None, f"no gradient for {tensor_name}"

    ref_leaves = [t.detach().clone().requires_grad_() for t in (image, text, log_scale, bias)]
    ref_fn = reference.clip_loss_reference if name == "ClipLoss" else reference.siglip_loss_reference
    ref_loss = ref_fn(ref_leaves[0], ref_leaves[1], ref_leaves[2].exp(), ref_leaves[3])
    ref_loss.backward()
    atol, rtol = TOLERANCES[torch.float32]
    assert_close("loss", total, ref_loss, atol, rtol)
    for grad_name, leaf, ref_leaf in zip(
        ("d_image_features", "d_text_features", "d_log_scale", "d_logit_bias"),
        (image, text, log_scale, bias),
        ref_leaves,
    ):
        assert_close(grad_name, leaf.grad, ref_leaf.grad, atol, rtol)


@pytest.mark.parametrize("name", ["ClipLoss", "SigLipLoss", "NTXentLoss", "NTXentLoss-bank", "DCLLoss", "DCLWLoss"])
def test_modules_have_no_parameters_and_an_empty_state_dict(name):
    # Like the originals (lightly's bank buffers are non-persistent), so checkpoints load either way.
    module = {
        "ClipLoss": ClipLoss,
        "SigLipLoss": SigLipLoss,
        "NTXentLoss": NTXentLoss,
        "NTXentLoss-bank": lambda: NTXentLoss(memory_bank_size=(16, 4)),
        "DCLLoss": lambda: DCLLoss(weight_fn=lambda a, b: (a * b).sum(1)),
        "DCLWLoss": DCLWLoss,
    }[name]()
    assert isinstance(module, torch.nn.Module)
    assert list(module.parameters()) == []
    assert list(module.state_dict()) == []
