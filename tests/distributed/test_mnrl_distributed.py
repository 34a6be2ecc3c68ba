"""``MultipleNegativesRankingLoss`` and ``GISTEmbedLoss`` with ``gather_across_devices=True`` on real 2- and
3-rank gloo groups, against sentence-transformers 6.2.0's own losses run in the same group.

Each rank holds its slice of one global batch (queries, positives, hard negatives). Both losses gather with
gradient (6.2.0 through ``torch.distributed.nn.all_gather``, fastcontrast through its own autograd gather), so
every rank's loss and embedding gradients must agree to fp64 rounding: the candidate order (every rank's
positives, then every rank's neg_1, …), the label offset rank·n and the reduce-scatter of the gradients.
One spawn per world size runs its cases: every case on 2 ranks; on 3 ranks (where a middle rank has
neighbours on both sides) the cases whose candidate order is the most involved: every direction with hard
negatives, the symmetric per-direction loss, and GIST with triplets. The Cached* losses run on 2 ranks
through a stand-in model with dropout (each rank's parameters' gradients after ``loss.backward()``, which
re-forwards the mini-batches). Each spawn has a deadline, and the collectives a gloo timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import DISTRIBUTED, assert_close, leave_process_group

pytest.importorskip("sentence_transformers.sentence_transformer.losses")

WORLD_SIZES = (2, 3)
ROWS = 3
DIM = 8
SPAWN_DEADLINE_S = 240
COLLECTIVE_TIMEOUT_S = 60
CASES = {
    "default-k0": dict(negatives=0),
    "default-k2": dict(negatives=2),
    "all-directions-joint-all-negatives-k1": dict(
        negatives=1, directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness_mode="all_negatives", hardness_strength=3.0),
    "symmetric-per-direction-in-batch-k1": dict(
        negatives=1, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
        hardness_mode="in_batch_negatives", hardness_strength=2.0),
    "hard-negatives-dot-k2": dict(negatives=2, hardness_mode="hard_negatives", hardness_strength=1.0,
                                  similarity="dot_score"),
}

GIST_CASES = {
    "gist-pairs": dict(columns=2),
    "gist-triplets-relative-no-anchor-contrast": dict(columns=3, margin_strategy="relative", margin=0.1,
                                                       contrast_anchors=False),
}

# The Cached* losses through a stand-in model with dropout, in mini-batches of 2 of each rank's 3 rows: every
# parameter's gradient after loss.backward() (the re-forward) against 6.2.0's Cached* loss.
CACHED_CASES = {
    "cached-mnrl-k1-in-batch-hardness": dict(loss="CachedMultipleNegativesRankingLoss", negatives=1,
                                            hardness_mode="in_batch_negatives", hardness_strength=2.0),
    "cached-symmetric-pairs": dict(loss="CachedMultipleNegativesSymmetricRankingLoss", negatives=0),
    "cached-gist-triplets-relative": dict(loss="CachedGISTEmbedLoss", negatives=1, temperature=0.1,
                                          margin_strategy="relative", margin=0.05),
}

# Spawning costs seconds (each rank imports sentence-transformers); 3 ranks run only these cases.
THREE_RANK_CASES = ("all-directions-joint-all-negatives-k1", "symmetric-per-direction-in-batch-k1",
                    "gist-triplets-relative-no-anchor-contrast")
CASES_BY_WORLD_SIZE = {2: list(CASES) + list(GIST_CASES) + list(CACHED_CASES), 3: list(THREE_RANK_CASES)}

pytestmark = pytest.mark.timeout(len(WORLD_SIZES) * SPAWN_DEADLINE_S + 60)


class EmbeddingLookup(torch.nn.Module):
    """A stand-in SentenceTransformer returning the embedding stored under ``key`` in the features."""

    def __init__(self, key, tokenizer):
        super().__init__()
        self.key, self.tokenizer, self.max_seq_length = key, tokenizer, 32

    def forward(self, features):
        return {"sentence_embedding": features[self.key]}


class DropoutEncoder(torch.nn.Module):
    """A SentenceTransformer stand-in's one module: features["x"] -> Linear -> Dropout -> "sentence_embedding"."""

    def __init__(self):
        super().__init__()
        self.linear, self.dropout = torch.nn.Linear(DIM, DIM, dtype=torch.float64), torch.nn.Dropout(0.3)

    def forward(self, features):
        return {**features, "sentence_embedding": self.dropout(self.linear(features["x"]))}


class StandInModel(torch.nn.Sequential):
    """What the Cached* losses need of a SentenceTransformer: indexable modules, a tokenizer, max_seq_length."""

    def __init__(self, tokenizer):
        torch.manual_seed(11)  # the same weights on every rank, as DDP replicas have
        super().__init__(DropoutEncoder())
        self.tokenizer, self.max_seq_length = tokenizer, 32


def _run_cached_case(rank, world_size, options):
    import tokenizers
    import transformers
    from sentence_transformers.sentence_transformer import losses as st_losses

    import fastcontrast

    options = dict(options)
    name, negatives = options.pop("loss"), options.pop("negatives")
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    model = StandInModel(tokenizer).train()
    guide = (EmbeddingLookup("guide", tokenizer),) if name == "CachedGISTEmbedLoss" else ()
    g = torch.Generator().manual_seed(7)
    global_columns = [torch.randn(world_size * ROWS, DIM, generator=g, dtype=torch.float64)
                      for _ in range(2 + negatives)]
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    features = [{"x": x[rows], "guide": x[rows, :5] + 0.3 * torch.randn(ROWS, 5, generator=g, dtype=torch.float64)}
                for x in global_columns]
    results = {}
    for label, cls in (("original", getattr(st_losses, name)), ("fastcontrast", getattr(fastcontrast, name))):
        loss = cls(model, *guide, mini_batch_size=2, gather_across_devices=True, **options)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + rank)
        value = loss([dict(f) for f in features], None)
        value.backward()
        results[label] = (value.detach(), [p.grad.clone() for p in model.parameters()])
    return results


def _run_gist_case(rank, world_size, options):
    import tokenizers
    import transformers
    from sentence_transformers.base.losses.merged_forward import column_merging_disabled
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as Original

    import fastcontrast

    options = dict(options)
    columns = options.pop("columns")
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    model, guide = EmbeddingLookup("model", tokenizer), EmbeddingLookup("guide", tokenizer)
    g = torch.Generator().manual_seed(5)
    global_model = [torch.randn(world_size * ROWS, DIM, generator=g, dtype=torch.float64) for _ in range(columns)]
    global_guide = [torch.cat([x[:, :5], 0.5 * torch.randn(x.shape[0], 2, generator=g, dtype=torch.float64)], 1)
                    for x in global_model]
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    results = {}
    for name, loss in (("original", Original(model, guide, temperature=0.1, gather_across_devices=True, **options)),
                       ("fastcontrast", fastcontrast.GISTEmbedLoss(model, guide, temperature=0.1,
                                                                   gather_across_devices=True, **options))):
        live = [x[rows].clone().requires_grad_() for x in global_model]
        features = [{"model": x, "guide": y[rows]} for x, y in zip(live, global_guide)]
        with column_merging_disabled():
            value = loss(features, None)
        results[name] = (value.detach(), [g_.detach() for g_ in torch.autograd.grad(value, live)])
    return results


def _run_case(rank, world_size, options):
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as Original

    import fastcontrast

    options = dict(options)
    negatives = options.pop("negatives")
    options["similarity_fct"] = getattr(util, options.pop("similarity", "cos_sim"))
    g = torch.Generator().manual_seed(99)
    global_columns = [torch.randn(world_size * ROWS, DIM, generator=g, dtype=torch.float64) * 2
                      for _ in range(negatives + 2)]
    local = [x[rank * ROWS:(rank + 1) * ROWS] for x in global_columns]
    results = {}
    for name, loss in (("original", Original(None, gather_across_devices=True, **options)),
                       ("fastcontrast", fastcontrast.MultipleNegativesRankingLoss(
                           None, gather_across_devices=True, backend="torch", **options))):
        live = [x.clone().requires_grad_() for x in local]
        value = loss.compute_loss_from_embeddings(live, None)
        results[name] = (value.detach(), [g_.detach() for g_ in torch.autograd.grad(value, live)])
    return results


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")  # torch.distributed.nn.all_gather (6.2.0's gather) is deprecated in torch 2.13
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    try:
        for name in CASES_BY_WORLD_SIZE[world_size]:
            try:
                if name in CASES:
                    results[name] = _run_case(rank, world_size, CASES[name])
                elif name in GIST_CASES:
                    results[name] = _run_gist_case(rank, world_size, GIST_CASES[name])
                else:
                    results[name] = _run_cached_case(rank, world_size, CACHED_CASES[name])
            except Exception:
                results[name] = {"crash": traceback.format_exc()}
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        leave_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world_size, out_dir):
    # The children run the torch engine only and never import triton. The variable is restored at once: the
    # rest of the session runs the kernels in the interpreter, which reads it on every call.
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        context = mp.start_processes(_worker, args=(world_size, _free_port(), str(out_dir)), nprocs=world_size,
                                     join=False, start_method="spawn")
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {world_size}-rank gloo group did not finish within {SPAWN_DEADLINE_S}s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """``rank_results(world_size)`` -> per-rank results, spawning that group once for the whole module."""
    spawned = {}

    def get(world_size):
        if world_size not in spawned:
            spawned[world_size] = _spawn(world_size, tmp_path_factory.mktemp(f"mnrl_dist_ws{world_size}"))
        return spawned[world_size]

    return get


@pytest.mark.parametrize("world_size, case", [
    pytest.param(world_size, case, id=f"ws{world_size}-{case}")
    for world_size in WORLD_SIZES for case in CASES_BY_WORLD_SIZE[world_size]
])
def test_gather_across_devices_matches_sentence_transformers_in_the_same_group(rank_results, world_size, case):
    atol, rtol = DISTRIBUTED[torch.float64]
    for rank, results in enumerate(rank_results(world_size)):
        result = results[case]
        assert "crash" not in result, f"rank {rank} of {world_size} crashed:\n{result['crash']}"
        (value, grads), (expected, expected_grads) = result["fastcontrast"], result["original"]
        assert_close(f"rank {rank} of {world_size} {case}: loss", value, expected, atol, rtol)
        for j, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
            assert_close(f"rank {rank} of {world_size} {case}: d embeddings[{j}]", grad, expected_grad, atol, rtol)


@pytest.mark.parametrize("world_size, case", [(2, "default-k2"), (3, "all-directions-joint-all-negatives-k1")],
                         ids=["ws2", "ws3"])
def test_ranks_see_different_losses_so_the_gather_is_not_trivial(rank_results, world_size, case):
    losses = [results[case]["original"][0] for results in rank_results(world_size)]
    for rank in range(1, world_size):
        assert not torch.equal(losses[rank - 1], losses[rank]), (
            f"ranks {rank - 1} and {rank} computed the same loss: the test would not see an offset bug")
