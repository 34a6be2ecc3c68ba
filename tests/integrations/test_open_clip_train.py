"""``python -m fastcontrast.open_clip_train`` against open_clip's own trainer, run for real on CPU.

A tiny CLIP (1-layer ViT on 32 px images and a 1-layer text tower, width 32) is trained on a CSV dataset of
random images with distinct captions (``--dataset-type synthetic`` repeats one sample, so its loss is a
constant and would prove nothing), once by ``open_clip_train.main`` unpatched and once through
``fastcontrast.open_clip_train``. Same seed, same data order, same augmentation draws (the loss consumes
no randomness), so every step's loss must agree to fp32 rounding, while parameters drift apart only by
rounding. Losses are recorded exactly by ``open_clip_runner.py`` through a module forward hook, which also
proves which loss class the trainer built. Two-rank runs use torchrun with gloo on CPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
from integration_support import subprocess_env

pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train.main", reason="open_clip's training extras (pandas, webdataset) are missing")

import fastcontrast  # noqa: E402
from fastcontrast.open_clip_train import split_argv  # noqa: E402

RUNNER = Path(__file__).parent / "open_clip_runner.py"
SAMPLES = 160  # 20 steps of 8 in one process, 10 steps of 8 per rank with two ranks
BATCH = 8
TIMEOUT_S = 240  # per trainer run; a hung collective fails the test instead of blocking CI

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    # SimpleTokenizer's BPE ids need the full CLIP vocabulary; the context is short to keep steps cheap.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# CoCa's layout (open_clip's coca_ViT-B-32.json) at the tiny CLIP's sizes, with a 1-layer caption decoder.
TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {**TINY_CLIP["vision_cfg"], "attentional_pool": True, "attn_pooler_heads": 2,
                   "output_tokens": True},
    "text_cfg": {**TINY_CLIP["text_cfg"], "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}
SHORT_SAMPLES = 48  # 6 steps of 8: the CoCa and mixed-precision cases


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dict[str, Path]:
    """A local-dir model config and a CSV of SAMPLES random 40×40 images with distinct captions."""
    import numpy as np
    from PIL import Image

    # The directory name matters: open_clip picks CoCaLoss for any model name containing "coca".
    root = tmp_path_factory.mktemp("open_clip_data")
    model_dir = root / "tiny-clip"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    # Patch dropout on (half of the 16 patches, chosen by torch.randn per sample): the cached step must replay
    # each chunk's draws in its re-forward.
    dropout_dir = root / "tiny-clip-patch-dropout"
    dropout_dir.mkdir()
    dropout_cfg = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "patch_dropout": 0.5}}
    (dropout_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": dropout_cfg, "preprocess_cfg": {}}))
    coca_dir = root / "tiny-coca-patch-dropout"  # "coca" in the name: open_clip's create_loss builds CoCaLoss
    coca_dir.mkdir()
    coca_cfg = {**TINY_COCA, "vision_cfg": {**TINY_COCA["vision_cfg"], "patch_dropout": 0.5}}
    (coca_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": coca_cfg, "preprocess_cfg": {}}))
    rng = np.random.default_rng(0)
    words = "red green blue cat dog tree house car boat bird sun moon river hill road".split()
    lines = ["filepath\ttitle"]
    for i in range(SAMPLES):
        path = root / f"image_{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        lines.append(f"{path}\t{' '.join(rng.choice(words, 4))} photo {i}")
    csv = root / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    # Captions of 1 to 12 words: the samples' non-pad token counts differ (3 to 14 of CoCa's 15 labels), so a
    # chunk's share of the batch's caption tokens is not its share of the samples.
    short_lines = ["filepath\ttitle"]
    for i in range(SHORT_SAMPLES):
        short_lines.append(f"{root / f'image_{i}.png'}\t{' '.join(rng.choice(words, 1 + i % 12))}")
    short_csv = root / "train_short.csv"
    short_csv.write_text("\n".join(short_lines) + "\n")
    return {"root": root, "model": model_dir, "model_patch_dropout": dropout_dir, "model_coca": coca_dir,
            "csv": csv, "csv_short": short_csv}


def train(dataset, name: str, via: str, nproc: int, flags: Sequence[str], model: str = "model",
          csv: str = "csv", precision: str = "fp32") -> List[dict]:
    """Run one training (``via`` = "open_clip" or "fastcontrast"); return each rank's recorded loss calls."""
    root = dataset["root"]
    argv = [
        "--model", f"local-dir:{dataset[model]}", "--train-data", str(dataset[csv]), "--dataset-type", "csv",
        "--batch-size", str(BATCH), "--epochs", "1", "--workers", "0", "--device", "cpu", "--precision", precision,
        "--lr", "1e-3", "--warmup", "2", "--seed", "0", "--logs", str(root / "logs"), "--name", name,
        "--log-every-n-steps", "1", *(flag.format(model_dir=dataset["model"]) for flag in flags),
    ]
    prefix = root / name
    job = root / f"{name}.job.json"
    job.write_text(json.dumps({"prefix": str(prefix), "via": via, "argv": argv}))
    runner = [str(RUNNER), str(job)]
    if nproc == 1:
        command = [sys.executable, *runner]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *runner]
    # A new session, so that on a timeout the whole tree (torchrun and its workers) can be killed.
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{name}: open_clip training did not finish in {TIMEOUT_S} s:\n{output[-4000:]}")
    assert process.returncode == 0, f"{name} failed (exit {process.returncode}):\n{output[-4000:]}"
    return [json.loads(Path(f"{prefix}.rank{rank}.json").read_text())["records"] for rank in range(nproc)]


def assert_losses_match(reference: List[dict], patched: List[dict], steps: int, rel_tol: float = 4e-6) -> None:
    # Default: fp32 rounding (measured: at most 3e-7 relative over 20 steps), with room for the parameters'
    # rounding-level drift over the steps before on other CPUs.
    assert len(reference) == len(patched) == steps
    for step, (ref, ours) in enumerate(zip(reference, patched)):
        assert ref["terms"].keys() == ours["terms"].keys()
        for term, expected in ref["terms"].items():
            assert math.isclose(ours["terms"][term], expected, rel_tol=rel_tol, abs_tol=1e-7), (
                f"step {step} {term}: fastcontrast {ours['terms'][term]!r} vs open_clip {expected!r} "
                f"(rel_tol {rel_tol})"
            )


CASES = {
    # name: (fastcontrast class, open_clip trainer flags, fastcontrast flags, ranks)
    "clip-1-process": ("ClipLoss", [], [], 1),
    "siglip-1-process": ("SigLipLoss", ["--siglip"], [], 1),
    "clip-1-process-accum-freq-2": ("ClipLoss", ["--accum-freq", "2"], [], 1),
    "clip-2-ranks-local-loss-gather-with-grad": (
        "ClipLoss", ["--local-loss", "--gather-with-grad"],
        ["--fastcontrast-backend", "torch", "--fastcontrast-chunk-bytes", "128"], 2,
    ),
    "siglip-2-ranks": ("SigLipLoss", ["--siglip"], ["--fastcontrast-chunk-bytes=128"], 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_open_clip_train_with_fastcontrast_gives_open_clips_losses_step_by_step(dataset, case):
    loss_name, flags, own_flags, nproc = CASES[case]
    reference = train(dataset, f"{case}-open_clip", "open_clip", nproc, flags)
    patched = train(dataset, f"{case}-fastcontrast", "fastcontrast", nproc, [*flags, *own_flags])
    # One loss call per batch (with --accum-freq, each batch's call holds the other cached batches too).
    steps = SAMPLES // (BATCH * nproc)
    assert steps >= 10
    ours = getattr(fastcontrast, loss_name)
    own, _ = split_argv(own_flags)
    for rank in range(nproc):
        # The patch took: open_clip's create_loss built fastcontrast's class, with the flags' options.
        assert {r["class"] for r in reference[rank]} == {f"open_clip.loss.{loss_name}"}
        assert all(f"{ours.__module__}.{ours.__qualname__}" in r["mro"] for r in patched[rank])
        assert {(r["backend"], r["chunk_bytes"]) for r in patched[rank]} == {
            (own.fastcontrast_backend, own.fastcontrast_chunk_bytes)
        }
        # The data varies, so equal losses mean something (a synthetic dataset would give one value).
        values = [r["terms"]["contrastive_loss"] for r in reference[rank]]
        assert max(values) - min(values) > 1e-2
        assert_losses_match(reference[rank], patched[rank], steps)
    if nproc > 1:
        # Each rank scored its own batch: the ranks' losses differ.
        assert reference[0][0]["terms"] != reference[1][0]["terms"]


@pytest.mark.parametrize(
    "argv, backend, chunk_bytes, rest",
    [
        pytest.param(["--siglip", "--lr", "1e-3"], "auto", None, ["--siglip", "--lr", "1e-3"], id="no-own-flags"),
        pytest.param(
            ["--model", "ViT-B-32", "--fastcontrast-backend", "torch", "--local-loss", "--fastcontrast-chunk-bytes",
             "4096", "--gather-with-grad"],
            "torch", 4096, ["--model", "ViT-B-32", "--local-loss", "--gather-with-grad"], id="separate-values",
        ),
        pytest.param(["--fastcontrast-backend=reference", "--wd", "-0.1", "--fastcontrast-chunk-bytes=64"],
                     "reference", 64, ["--wd", "-0.1"], id="equals-form-and-negative-open-clip-value"),
    ],
)
def test_cli_takes_out_only_its_own_flags_and_keeps_the_rest_in_order(argv, backend, chunk_bytes, rest):
    own, remaining = split_argv(argv)
    assert (own.fastcontrast_backend, own.fastcontrast_chunk_bytes, remaining) == (backend, chunk_bytes, rest)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--fastcontrast-backend", "cuda"], id="unknown-backend"),
        pytest.param(["--fastcontrast-chunk-bytes", "0"], id="zero-chunk-bytes"),
        pytest.param(["--fastcontrast-chunk-bytes", "8MiB"], id="non-integer-chunk-bytes"),
        pytest.param(["--fastcontrast-grad-cache", "0"], id="zero-grad-cache-chunk"),
        pytest.param(["--fastcontrast-grad-cache=half"], id="non-integer-grad-cache-chunk"),
        pytest.param(["--lr", "1e-3", "--fastcontrast-backend"], id="missing-value"),
    ],
)
def test_cli_rejects_bad_own_flags_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        split_argv(argv)
    assert exit_info.value.code == 2
    assert "fastcontrast" in capsys.readouterr().err


def test_module_entry_point_prints_its_flags_then_open_clip_trains_help():
    result = subprocess.run([sys.executable, "-m", "fastcontrast.open_clip_train", "--help"], capture_output=True,
                            text=True, timeout=TIMEOUT_S, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-4000:]
    ours, open_clips = result.stdout.index("--fastcontrast-chunk-bytes"), result.stdout.index("--train-data")
    assert ours < open_clips


GRAD_CACHE_CASES = {
    # name: (fastcontrast class, open_clip trainer flags, fastcontrast flags, ranks)
    "clip-1-process": ("ClipLoss", [], ["--fastcontrast-grad-cache", "4"], 1),
    "siglip-1-process": ("SigLipLoss", ["--siglip"], ["--fastcontrast-grad-cache=3", "--fastcontrast-backend",
                                                      "torch"], 1),
    "clip-2-ranks-local-loss-gather-with-grad": (
        "ClipLoss", ["--local-loss", "--gather-with-grad"], ["--fastcontrast-grad-cache", "4"], 2,
    ),
    # The teacher: the tiny CLIP without patch dropout, random weights ('local-dir:' ignores --distill-pretrained).
    "distill-1-process": (
        "DistillClipLoss", ["--distill-model", "local-dir:{model_dir}", "--distill-pretrained", "unused"],
        ["--fastcontrast-grad-cache", "4"], 1,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(GRAD_CACHE_CASES))
def test_grad_cache_step_gives_open_clips_full_batch_losses_step_by_step_with_patch_dropout(dataset, case):
    # open_clip's plain step over the batch of 8 against the cached step in chunks of 4 (or 3, 3, 2: a ragged
    # last chunk), patch dropout on. The draws of chunked and whole-batch forwards coincide here (checked:
    # torch's CPU randn fills [8, 16] value for value as [4, 16] twice, or [3, 16], [3, 16], [2, 16]), so the
    # plain step is the reference. Each step's loss depends on every earlier step's gradient, so equal losses
    # over the steps mean equal gradients; without the replay the re-forward would draw other patches.
    loss_name, flags, own_flags, nproc = GRAD_CACHE_CASES[case]
    reference = train(dataset, f"cache-{case}-open_clip", "open_clip", nproc, flags, model="model_patch_dropout")
    patched = train(dataset, f"cache-{case}-fastcontrast", "fastcontrast", nproc, [*flags, *own_flags],
                    model="model_patch_dropout")
    steps = SAMPLES // (BATCH * nproc)
    ours = getattr(fastcontrast, loss_name)
    for rank in range(nproc):
        assert all(f"{ours.__module__}.{ours.__qualname__}" in r["mro"] for r in patched[rank])
        values = [r["terms"]["contrastive_loss"] for r in reference[rank]]
        assert max(values) - min(values) > 1e-2
        # One loss call per step, as in the plain step (--accum-freq k would make k).
        assert_losses_match(reference[rank], patched[rank], steps)


def test_cli_takes_the_grad_cache_chunk_out_of_the_argument_list():
    own, rest = split_argv(["--batch-size", "64", "--fastcontrast-grad-cache", "16", "--siglip"])
    assert (own.fastcontrast_grad_cache, rest) == (16, ["--batch-size", "64", "--siglip"])
    assert split_argv(["--siglip"])[0].fastcontrast_grad_cache is None


@pytest.mark.parametrize(
    "options, match",
    [
        pytest.param({"accum_freq": 2}, r"cannot be combined with --accum-freq 2", id="accum-freq"),
        pytest.param({"horovod": True}, r"does not support --horovod", id="horovod"),
    ],
)
def test_grad_cache_refuses_trainer_options_that_would_change_the_step(options, match):
    import argparse

    from fastcontrast.integrations.open_clip_grad_cache import check_args

    args = argparse.Namespace(**{"accum_freq": 1, "horovod": False, "model": "ViT-B-32", **options})
    with pytest.raises(ValueError, match=match):
        check_args(args, 8)
    for model in ("ViT-B-32", "coca_ViT-B-32"):
        check_args(argparse.Namespace(accum_freq=1, horovod=False, model=model), 8)


@pytest.mark.slow
def test_grad_cache_step_gives_open_clips_coca_losses_step_by_step(dataset):
    # CoCa: contrastive part and caption loss (a mean over the batch's non-pad tokens) in ragged chunks of
    # 3, 3, 2 whose token counts differ, with patch dropout on; both terms equal open_clip's plain step.
    reference = train(dataset, "cache-coca-open_clip", "open_clip", 1, [], model="model_coca", csv="csv_short")
    patched = train(dataset, "cache-coca-fastcontrast", "fastcontrast", 1, ["--fastcontrast-grad-cache", "3"],
                    model="model_coca", csv="csv_short")
    assert {r["class"] for r in reference[0]} == {"open_clip.loss.CoCaLoss"}
    # The trainer built fastcontrast's CoCaLoss; the cached step called it through its stand-in.
    coca = f"{fastcontrast.CoCaLoss.__module__}.{fastcontrast.CoCaLoss.__qualname__}"
    assert all(r["class"].endswith(".CachedCaptionCoCaLoss") and coca in r["wraps"] for r in patched[0])
    for term in ("contrastive_loss", "caption_loss"):
        values = [r["terms"][term] for r in reference[0]]
        assert max(values) - min(values) > 1e-2, term
    assert_losses_match(reference[0], patched[0], SHORT_SAMPLES // BATCH)


def test_cached_caption_loss_is_cocas_token_mean_and_its_gradient():
    # The stand-in's loss against fastcontrast's CoCaLoss on the whole batch: value and gradients w.r.t. the
    # features, the scale and the caption logits (through the per-sample sums), with pad tokens (id 0) and
    # ragged token counts; fp64, so equal to rounding.
    import torch

    from fastcontrast.integrations.open_clip_grad_cache import CachedCaptionCoCaLoss, caption_token_sums

    torch.manual_seed(0)
    n, length, vocab = 7, 5, 11
    image = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    text = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(n, length, vocab, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(1, vocab, (n, length))
    for row in range(n):
        labels[row, 1 + row % (length - 1):] = 0
    coca = fastcontrast.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=0.5, backend="torch")
    expected = coca(image, text, logits, labels, scale, output_dict=True)
    sums, counts = caption_token_sums(logits, labels, pad_id=0)
    ours = CachedCaptionCoCaLoss(coca)(image, text, sums, counts, scale, output_dict=True)
    inputs = (image, text, logits, scale)
    for term in ("contrastive_loss", "caption_loss"):
        torch.testing.assert_close(ours[term], expected[term], msg=lambda m, t=term: f"{t}: {m}")
        for name, got, want in zip(("image", "text", "logits", "scale"),
                                   torch.autograd.grad(ours[term], inputs, retain_graph=True, allow_unused=True),
                                   torch.autograd.grad(expected[term], inputs, retain_graph=True, allow_unused=True)):
            if want is None:
                assert got is None or not got.any(), f"d {term} / d {name}: expected none"
            else:
                torch.testing.assert_close(got, want, msg=lambda m, t=term, k=name: f"d {t} / d {k}: {m}")
    no_clip = CachedCaptionCoCaLoss(fastcontrast.CoCaLoss(2.0, 0.0))(image, text, sums, counts, scale)
    assert no_clip[0].dtype == torch.int64 and no_clip[0].item() == 0



@pytest.mark.slow
@pytest.mark.parametrize(
    "precision, rel_tol",
    [
        # Two units in the last place of the autocast format (2 ** -7 for bf16's 8-bit significand, 2 ** -10
        # for fp16's 11-bit one), relative. Under autocast the linear layers round their outputs to that format,
        # and oneDNN's GEMMs for 4 rows and for 8 rows round differently, so the cached step's features are the
        # plain step's to within a rounding of the format, not bit for bit (in fp32 they are bit for bit), and
        # the parameters then drift by as much over the steps. Measured over the 6 steps: at most 0.77 ulp
        # (bf16: 3.0e-3 relative) and 0.70 ulp (fp16: 3.4e-4); open_clip's own bf16 step is 4.4e-3 away from
        # its fp32 step over the same steps.
        pytest.param("amp_bf16", 2**-7, id="amp_bf16"),
        # fp16 autocast and GradScaler (torch.amp.GradScaler(device="cpu")): both run on CPU.
        pytest.param("amp", 2**-10, id="amp-fp16-grad-scaler"),
    ],
)
def test_grad_cache_step_gives_open_clips_losses_under_mixed_precision(dataset, precision, rel_tol):
    reference = train(dataset, f"cache-{precision}-open_clip", "open_clip", 1, [], model="model_patch_dropout",
                      csv="csv_short", precision=precision)
    patched = train(dataset, f"cache-{precision}-fastcontrast", "fastcontrast", 1, ["--fastcontrast-grad-cache", "4"],
                    model="model_patch_dropout", csv="csv_short", precision=precision)
    assert_losses_match(reference[0], patched[0], SHORT_SAMPLES // BATCH, rel_tol=rel_tol)
    if precision == "amp":
        # GradScaler's first scale (2 ** 16) overflows fp16 gradients: open_clip's step 0 is skipped (the logit
        # scale the next step's loss sees is unchanged), and the cached step, which scales the loss before its
        # gradients are cached, must overflow and skip it too.
        for run in (reference[0], patched[0]):
            assert run[1]["logit_scale"] == run[0]["logit_scale"] != run[2]["logit_scale"]
