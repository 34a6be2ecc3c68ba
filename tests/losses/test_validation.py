"""Bad inputs fail early with ValueError / TypeError whose message names the offending argument."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch

import fastcontrast
from fastcontrast import ClipLoss, DCLLoss, DCLWLoss, NTXentLoss, SigLipLoss

PACKAGE_DIR = pathlib.Path(fastcontrast.__file__).parent


def feats(n: int = 4, d: int = 3, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(n, d, dtype=dtype, device=device)


BANK = torch.nn.functional.normalize(torch.randn(6, 3), dim=1)


def clip(a, b, scale=10.0, bias=None, **kw):
    return fastcontrast.clip_loss(a, b, scale, bias, backend="torch", **kw)


def siglip(a, b, scale=10.0, bias=-1.0, **kw):
    return fastcontrast.siglip_loss(a, b, scale, bias, backend="torch", **kw)


def nt_xent(a, b, **kw):
    return fastcontrast.nt_xent_loss(a, b, backend="torch", **kw)


def nt_xent_bank(a, b, bank=BANK, **kw):
    return fastcontrast.nt_xent_memory_bank_loss(a, b, bank, backend="torch", **kw)


def dcl(a, b, **kw):
    return fastcontrast.dcl_loss(a, b, backend="torch", **kw)


def modules():
    """Each loss module called on (a, b) with valid scale/bias where it takes them."""
    return {
        "ClipLoss": lambda a, b: ClipLoss(backend="torch")(a, b, 10.0),
        "SigLipLoss": lambda a, b: SigLipLoss(backend="torch")(a, b, 10.0, -1.0),
        "NTXentLoss": lambda a, b: NTXentLoss(backend="torch")(a, b),
        "NTXentLoss-bank": lambda a, b: NTXentLoss(memory_bank_size=(6, 3), backend="torch")(a, b),
        "DCLLoss": lambda a, b: DCLLoss(backend="torch")(a, b),
        "DCLWLoss": lambda a, b: DCLWLoss(backend="torch")(a, b),
    }


FEATURE_NAMES = {
    "clip": ("image_features", "text_features", clip),
    "siglip": ("image_features", "text_features", siglip),
    "nt_xent": ("out0", "out1", nt_xent),
    "nt_xent_bank": ("out0", "out1", nt_xent_bank),
    "dcl": ("out0", "out1", dcl),
}

# (id, make first input, make second input, exception, what the message must name)
BAD_FEATURES = [
    ("first-1d", lambda: torch.randn(4), feats, ValueError, "{first}"),
    ("second-3d", feats, lambda: torch.randn(4, 3, 1), ValueError, "{second}"),
    ("first-not-a-tensor", lambda: [[1.0, 2.0, 3.0]] * 4, feats, TypeError, "{first}"),
    ("feature-dims-differ", feats, lambda: feats(4, 5), ValueError, "feature dim"),
    ("batch-sizes-differ", feats, lambda: feats(5, 3), ValueError, "batch size"),
    ("first-empty-batch", lambda: feats(0, 3), lambda: feats(0, 3), ValueError, "{first}"),
    ("second-empty-batch", feats, lambda: feats(0, 3), ValueError, "{second}"),
    ("zero-feature-dim", lambda: feats(4, 0), lambda: feats(4, 0), ValueError, "{first}"),
    ("first-int64", lambda: torch.ones(4, 3, dtype=torch.long), feats, TypeError, "{first}"),
    ("second-bool", feats, lambda: torch.ones(4, 3, dtype=torch.bool), TypeError, "{second}"),
    ("mixed-fp32-fp64", feats, lambda: feats(dtype=torch.float64), TypeError, "same dtype"),
    (
        "mixed-bf16-fp16",
        lambda: feats(dtype=torch.bfloat16),
        lambda: feats(dtype=torch.float16),
        TypeError,
        "dtype",
    ),
    ("devices-differ", feats, lambda: feats(device="meta"), ValueError, "same device"),
]


@pytest.mark.parametrize("kind", FEATURE_NAMES)
@pytest.mark.parametrize(
    "make_first, make_second, error, names",
    [pytest.param(*case[1:], id=case[0]) for case in BAD_FEATURES],
)
def test_bad_features_raise_a_clear_error(kind, make_first, make_second, error, names):
    first, second, loss = FEATURE_NAMES[kind]
    message = names.format(first=first, second=second)
    with pytest.raises(error, match=re.escape(message)):
        loss(make_first(), make_second())


@pytest.mark.parametrize("module", modules())
def test_modules_reject_mismatched_batch_sizes(module):
    with pytest.raises(ValueError, match="batch size"):
        modules()[module](feats(4, 3), feats(5, 3))


def test_meta_device_tensors_have_a_device_distinct_from_cpu():
    # The device checks above use "meta" as the second device on a CPU-only machine.
    assert torch.empty(1, device="meta").device != torch.empty(1).device


BAD_SCALES = [
    ("vector", lambda: torch.tensor([1.0, 2.0]), ValueError, "scalar"),
    ("matrix-1x2", lambda: torch.ones(1, 2), ValueError, "scalar"),
    ("empty", lambda: torch.ones(0), ValueError, "scalar"),
    ("zero-float", lambda: 0.0, ValueError, "finite positive"),
    ("negative-float", lambda: -1.0, ValueError, "finite positive"),
    ("inf-float", lambda: float("inf"), ValueError, "finite positive"),
    ("nan-float", lambda: float("nan"), ValueError, "finite positive"),
    ("zero-tensor", lambda: torch.tensor(0.0), ValueError, "finite positive"),
    ("negative-tensor", lambda: torch.tensor([-3.0]), ValueError, "finite positive"),
    ("inf-tensor", lambda: torch.tensor(float("inf")), ValueError, "finite positive"),
    ("nan-tensor", lambda: torch.tensor(float("nan")), ValueError, "finite positive"),
    ("int-tensor", lambda: torch.tensor(3), TypeError, "floating-point"),
    ("bool", lambda: True, TypeError, "bool"),
    ("string", lambda: "10", TypeError, "tensor"),
    ("other-device", lambda: torch.tensor(10.0, device="meta"), ValueError, "device"),
]


@pytest.mark.parametrize("kind", ["clip", "siglip", "ClipLoss", "SigLipLoss"])
@pytest.mark.parametrize(
    "make_scale, error, detail", [pytest.param(*case[1:], id=case[0]) for case in BAD_SCALES]
)
def test_bad_logit_scale_raises_and_names_logit_scale(kind, make_scale, error, detail):
    a, b = feats(), feats()
    calls = {
        "clip": lambda s: clip(a, b, s),
        "siglip": lambda s: siglip(a, b, s),
        "ClipLoss": lambda s: ClipLoss()(a, b, s),
        "SigLipLoss": lambda s: SigLipLoss()(a, b, s, None),
    }
    with pytest.raises(error, match=f"`logit_scale`.*{re.escape(detail)}"):
        calls[kind](make_scale())


@pytest.mark.parametrize(
    "bias, error, detail",
    [
        pytest.param(float("inf"), ValueError, "finite", id="inf-float"),
        pytest.param(float("nan"), ValueError, "finite", id="nan-float"),
        pytest.param(torch.zeros(2), ValueError, "scalar", id="vector"),
        pytest.param(torch.tensor(1), TypeError, "floating-point", id="int-tensor"),
        pytest.param(torch.tensor(1.0, device="meta"), ValueError, "device", id="other-device"),
    ],
)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bad_logit_bias_raises_and_names_logit_bias(kind, bias, error, detail):
    loss = clip if kind == "clip" else siglip
    with pytest.raises(error, match=f"`logit_bias`.*{re.escape(detail)}"):
        loss(feats(), feats(), 10.0, bias)


def test_negative_logit_bias_is_accepted():
    # SigLIP's bias starts at −10: only the scale must be positive.
    assert torch.isfinite(siglip(feats(), feats(), 10.0, -10.0))


# Every way to give lightly's losses a temperature: the modules' constructors and the functional losses.
TEMPERATURE_CALLS = {
    "NTXentLoss": lambda t: NTXentLoss(temperature=t, backend="torch")(feats(), feats()),
    "nt_xent": lambda t: nt_xent(feats(), feats(), temperature=t),
    "nt_xent_bank": lambda t: nt_xent_bank(feats(), feats(), temperature=t),
    "DCLLoss": lambda t: DCLLoss(temperature=t, backend="torch")(feats(), feats()),
    "DCLWLoss": lambda t: DCLWLoss(temperature=t, backend="torch")(feats(), feats()),
    "dcl": lambda t: dcl(feats(), feats(), temperature=t),
}


@pytest.mark.parametrize("kind", TEMPERATURE_CALLS)
@pytest.mark.parametrize(
    "temperature", [0.0, 1e-9, -1e-9, 9.9e-9, float("nan")], ids=["0", "1e-9", "-1e-9", "9.9e-9", "nan"]
)
def test_temperature_below_1e_8_in_magnitude_is_an_error(temperature, kind):
    # lightly's NT-Xent rule; its DCL divides by τ unchecked (inf / NaN losses), so fastcontrast applies it there too.
    with pytest.raises(ValueError, match="`temperature`"):
        TEMPERATURE_CALLS[kind](temperature)


@pytest.mark.parametrize("kind", ["NTXentLoss", "DCLLoss", "DCLWLoss"])
@pytest.mark.parametrize("temperature", [-0.5, 1e-8, -1e-8], ids=["-0.5", "1e-8", "-1e-8"])
def test_negative_and_borderline_temperatures_are_accepted_like_lightly(temperature, kind):
    loss = TEMPERATURE_CALLS[kind](temperature)
    assert loss.shape == () and not torch.isnan(loss)


@pytest.mark.parametrize("module", [NTXentLoss, DCLLoss, DCLWLoss], ids=lambda m: m.__name__)
def test_temperature_must_be_a_number(module):
    with pytest.raises(TypeError, match="`temperature`"):
        module(temperature="0.5")


@pytest.mark.parametrize("kind", ["DCLLoss", "dcl"])
@pytest.mark.parametrize("weight_fn", ["not callable", 1.0, torch.ones(4)], ids=["str", "float", "tensor"])
def test_dcl_weight_fn_that_is_not_callable_is_a_type_error(kind, weight_fn):
    with pytest.raises(TypeError, match="`weight_fn` must be callable"):
        if kind == "DCLLoss":
            DCLLoss(weight_fn=weight_fn)
        else:
            dcl(feats(), feats(), weight_fn=weight_fn)


@pytest.mark.parametrize("kind", ["DCLLoss", "dcl"])
@pytest.mark.parametrize(
    "weights",
    [lambda n: torch.ones(n, 1), lambda n: torch.ones(n + 1), lambda n: torch.ones(2), lambda n: torch.ones(n, n)],
    ids=["n-by-1", "n+1", "2", "n-by-n"],
)
def test_dcl_weight_fn_returning_neither_a_scalar_nor_n_weights_is_a_value_error(kind, weights):
    # lightly would broadcast [n, 1] or [n, n] against its [n] positives into an [n, n] loss, silently.
    def weight_fn(out0, out1):
        return weights(out0.shape[0])

    with pytest.raises(ValueError, match="`weight_fn` must return a scalar or one weight per sample"):
        if kind == "DCLLoss":
            DCLLoss(weight_fn=weight_fn, backend="torch")(feats(), feats())
        else:
            dcl(feats(), feats(), weight_fn=weight_fn)


@pytest.mark.parametrize(
    "sigma, error", [(0.0, ValueError), (-0.5, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
                     ("0.5", TypeError), (None, TypeError), (True, TypeError)],
    ids=["0", "negative", "inf", "nan", "str", "None", "bool"],
)
def test_dclw_sigma_must_be_a_finite_positive_number(sigma, error):
    with pytest.raises(error, match="`sigma`"):
        DCLWLoss(sigma=sigma)


@pytest.mark.parametrize("backend", ["cuda", "Torch", "", None], ids=["cuda", "Torch", "empty", "None"])
def test_unknown_backend_fails_at_construction(backend):
    for make in (
        lambda: ClipLoss(backend=backend),
        lambda: SigLipLoss(backend=backend),
        lambda: NTXentLoss(backend=backend),
        lambda: DCLLoss(backend=backend),
        lambda: DCLWLoss(backend=backend),
    ):
        with pytest.raises(ValueError, match="`backend`"):
            make()


@pytest.mark.parametrize("kind", FEATURE_NAMES)
def test_unknown_backend_fails_in_functional(kind):
    calls = {
        "clip": lambda: fastcontrast.clip_loss(feats(), feats(), 10.0, backend="gpu"),
        "siglip": lambda: fastcontrast.siglip_loss(feats(), feats(), 10.0, -1.0, backend="gpu"),
        "nt_xent": lambda: fastcontrast.nt_xent_loss(feats(), feats(), backend="gpu"),
        "nt_xent_bank": lambda: fastcontrast.nt_xent_memory_bank_loss(feats(), feats(), BANK, backend="gpu"),
        "dcl": lambda: fastcontrast.dcl_loss(feats(), feats(), backend="gpu"),
    }
    with pytest.raises(ValueError, match="`backend`"):
        calls[kind]()


def test_fastcontrast_backend_environment_variable_must_name_a_backend(monkeypatch):
    monkeypatch.setenv("FASTCONTRAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTCONTRAST_BACKEND"):
        fastcontrast.clip_loss(feats(), feats(), 10.0)


def test_use_horovod_is_rejected_at_construction():
    with pytest.raises(ValueError, match="`use_horovod"):
        ClipLoss(use_horovod=True)


@pytest.mark.parametrize(
    "make_loss",
    [
        pytest.param(lambda: ClipLoss(rank=0, world_size=2, backend="torch"), id="ClipLoss"),
        pytest.param(
            lambda: ClipLoss(local_loss=True, rank=1, world_size=2, backend="torch"), id="ClipLoss-local"
        ),
        pytest.param(lambda: SigLipLoss(rank=0, world_size=2, backend="torch"), id="SigLipLoss"),
    ],
)
def test_world_size_above_one_without_a_process_group_fails_clearly(make_loss):
    assert not torch.distributed.is_initialized()
    with pytest.raises((NotImplementedError, ValueError, RuntimeError), match="world_size|process group"):
        make_loss()(feats(), feats(), 10.0, -1.0)


@pytest.mark.parametrize(
    "make, error, name",
    [
        pytest.param(lambda: ClipLoss(rank=2, world_size=2), ValueError, "`rank`", id="rank-not-below-world"),
        pytest.param(lambda: ClipLoss(rank=-1), ValueError, "`rank`", id="negative-rank"),
        pytest.param(lambda: SigLipLoss(world_size=0), ValueError, "`world_size`", id="world-size-0"),
        pytest.param(lambda: ClipLoss(local_loss="yes"), TypeError, "`local_loss`", id="flag-not-bool"),
        pytest.param(lambda: SigLipLoss(dist_impl="ring"), ValueError, "`dist_impl`", id="unknown-dist-impl"),
        pytest.param(
            lambda: NTXentLoss(memory_bank_size=-1), ValueError, "`memory_bank_size`", id="bank-negative"
        ),
        pytest.param(
            lambda: NTXentLoss(memory_bank_size=(4, 3, 2)),
            ValueError,
            "`memory_bank_size`",
            id="bank-3-tuple",
        ),
        pytest.param(
            lambda: NTXentLoss(memory_bank_size=(4.0, 3)), TypeError, "`memory_bank_size`", id="bank-float"
        ),
        pytest.param(
            lambda: NTXentLoss(gather_distributed=1), TypeError, "`gather_distributed`", id="gather-not-bool"
        ),
        pytest.param(
            lambda: DCLLoss(gather_distributed="yes"), TypeError, "`gather_distributed`", id="dcl-gather-not-bool"
        ),
        pytest.param(
            lambda: DCLWLoss(gather_distributed=1), TypeError, "`gather_distributed`", id="dclw-gather-not-bool"
        ),
        pytest.param(lambda: DCLLoss(chunk_bytes=0), ValueError, "`chunk_bytes`", id="dcl-chunk-bytes-0"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(make, error, name):
    with pytest.raises(error, match=name):
        make()


@pytest.mark.parametrize("chunk_bytes", [0, -8, 1.5, True], ids=["0", "-8", "float", "bool"])
def test_bad_chunk_bytes_names_chunk_bytes(chunk_bytes):
    with pytest.raises(ValueError, match="`chunk_bytes`"):
        clip(feats(), feats(), chunk_bytes=chunk_bytes)


def test_memory_bank_dim_must_match_the_features():
    with pytest.raises(ValueError, match="memory bank feature dim"):
        nt_xent_bank(feats(4, 3), feats(4, 3), bank=torch.randn(6, 5))
    loss = NTXentLoss(memory_bank_size=(6, 5), backend="torch")
    with pytest.raises(ValueError, match="memory bank feature dim"):
        loss(feats(4, 3), feats(4, 3))


def test_triton_backend_on_cpu_without_interpreter_is_a_value_error(monkeypatch):
    # resolve_engine reads TRITON_INTERPRET when the loss is called, not at import.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton'.*CUDA"):
        fastcontrast.clip_loss(feats(), feats(), 10.0, backend="triton")
    with pytest.raises(ValueError, match="backend='triton'.*CUDA"):
        NTXentLoss(backend="triton")(feats(), feats())
    with pytest.raises(ValueError, match="backend='triton'.*CUDA"):
        DCLWLoss(backend="triton")(feats(), feats())


def test_no_assert_statements_guard_anything_in_the_package():
    # `python -O` strips asserts; user errors must be real exceptions.
    offenders = [
        f"{path.name}:{lineno}: {line.strip()}"
        for path in sorted(PACKAGE_DIR.glob("*.py"))
        for lineno, line in enumerate(path.read_text().splitlines(), start=1)
        if re.match(r"^\s*assert\b", line)
    ]
    assert not offenders, "assert statements in fastcontrast/: " + "; ".join(offenders)
    assert len(list(PACKAGE_DIR.glob("*.py"))) >= 8, f"package sources not found in {PACKAGE_DIR}"


def test_validation_still_raises_under_python_dash_O():
    script = (
        "import torch, fastcontrast\n"
        "try:\n"
        "    fastcontrast.clip_loss(torch.randn(4, 3), torch.randn(5, 3), 10.0)\n"
        "except ValueError as e:\n"
        "    print('raised:', e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "raised:" in result.stdout and "batch size" in result.stdout, result.stdout + result.stderr
