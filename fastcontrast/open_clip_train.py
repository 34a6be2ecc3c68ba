"""``python -m fastcontrast.open_clip_train <open_clip_train arguments>``: open_clip's trainer with fastcontrast losses.

    python -m fastcontrast.open_clip_train --train-data data.csv --model ViT-B-32 --batch-size 4096 ...
    torchrun --nproc_per_node 8 -m fastcontrast.open_clip_train -- --siglip --fastcontrast-backend triton ...

(With torchrun, the ``--`` matters as soon as ``--logs`` is among the arguments: torchrun's own parser
rejects it as an ambiguous abbreviation of its ``--logs-specs``, and drops the ``--`` before the script
sees it (checked with Python 3.11, torch 2.13). The same holds for ``torchrun -m open_clip_train.main``.)

It removes its own flags, applies :func:`fastcontrast.integrations.patch_open_clip`, and runs open_clip's
own entry point (``open_clip_train.main.main``) with every other argument unchanged, so ``--siglip``,
``--distill-*``, CoCa models, ``--local-loss``, ``--gather-with-grad``, ``--accum-freq``, ``--precision``
and torchrun / SLURM launches behave exactly as with ``python -m open_clip_train.main``; only the loss
module differs.

Own flags (``--flag value`` or ``--flag=value``, anywhere on the line):
    --fastcontrast-backend {auto,torch,triton,reference}   default: auto
    --fastcontrast-chunk-bytes N                           logits bytes per chunk of the torch engine
    --fastcontrast-grad-cache CHUNK                        the gradient-cached step: embed and re-forward in
                                                           chunks of CHUNK samples per rank, loss once per step
                                                           (docs/cached_step.md); not with --accum-freq > 1

Exit status: 0, or 1 when open_clip's main reports a failure by returning a negative value (it returns -1
for e.g. "experiment already exists" instead of raising).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import List, Optional, Sequence, Tuple

BACKENDS = ("auto", "torch", "triton", "reference")
OWN_FLAGS = ("--fastcontrast-backend", "--fastcontrast-chunk-bytes", "--fastcontrast-grad-cache")

USAGE = """\
python -m fastcontrast.open_clip_train [--fastcontrast-backend {auto,torch,triton,reference}]
                                              [--fastcontrast-chunk-bytes N] [--fastcontrast-grad-cache CHUNK]
                                              <open_clip_train arguments>"""
HELP = f"""usage: {USAGE}

Runs open_clip_train.main with open_clip's losses replaced by fastcontrast's. Every argument other than
the --fastcontrast-* flags goes to open_clip_train unchanged; open_clip_train's own help follows.
"""


def _positive_int(text: str, what: str = "bytes") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer number of {what}, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer number of {what}, got {text!r}")
    return value


def _positive_samples(text: str) -> int:
    return _positive_int(text, "samples per chunk")


def _own_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastcontrast.open_clip_train", usage=USAGE, add_help=False,
                                     allow_abbrev=False)
    parser.add_argument("--fastcontrast-backend", choices=BACKENDS, default="auto")
    parser.add_argument("--fastcontrast-chunk-bytes", type=_positive_int, default=None)
    parser.add_argument("--fastcontrast-grad-cache", type=_positive_samples, default=None, metavar="CHUNK")
    return parser


def split_argv(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """Take the ``--fastcontrast-*`` flags out of ``argv``; return them parsed and the rest, order kept.

    Done by hand rather than with ``parse_known_args`` so that nothing else can be consumed or reordered:
    open_clip's arguments (values starting with ``-``, repeated flags, ...) pass through verbatim.
    """
    own: List[str] = []
    rest: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in OWN_FLAGS:
            if i + 1 >= len(args):
                _own_parser().error(f"argument {arg}: expected one argument")
            own += [arg, args[i + 1]]
            i += 2
            continue
        if arg.split("=", 1)[0] in OWN_FLAGS:
            own.append(arg)
        else:
            rest.append(arg)
        i += 1
    return _own_parser().parse_args(own), rest


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run open_clip's trainer on ``argv`` (default ``sys.argv[1:]``) with the losses patched. Returns 0 or 1."""
    own, open_clip_argv = split_argv(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in open_clip_argv):
        print(HELP)
    try:
        from open_clip_train.main import main as open_clip_main
    except ImportError as exc:
        raise SystemExit(
            f"python -m fastcontrast.open_clip_train needs open_clip's training package (open_clip_train), which "
            f"does not import ({exc}): pip install 'open_clip_torch[training]'"
        ) from exc

    from fastcontrast.integrations import patch_open_clip

    with contextlib.ExitStack() as stack:
        stack.enter_context(patch_open_clip(backend=own.fastcontrast_backend, chunk_bytes=own.fastcontrast_chunk_bytes))
        if own.fastcontrast_grad_cache is not None:
            from fastcontrast.integrations.open_clip_grad_cache import patch_open_clip_train

            stack.enter_context(patch_open_clip_train(own.fastcontrast_grad_cache))
        result = open_clip_main(open_clip_argv)
    return 1 if isinstance(result, int) and result < 0 else 0


if __name__ == "__main__":
    sys.exit(main())
