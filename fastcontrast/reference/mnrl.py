"""sentence-transformers 6.2.0's ``MultipleNegativesRankingLoss`` (any similarity) and ``GISTEmbedLoss`` from
embeddings.

Naive, full-matrix, in the input dtype: the original's math line for line (see :mod:`fastcontrast.reference`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def mnrl_loss_reference(
    queries: torch.Tensor,
    queries_all: torch.Tensor,
    docs_all: list,
    scale: float,
    similarity_fct,
    directions: tuple = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: Optional[str] = None,
    hardness_strength: float = 0.0,
    *,
    offset: int = 0,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """sentence-transformers 6.2.0 ``MultipleNegativesRankingLoss.compute_loss_from_embeddings``, full matrices.

    ``false_negative_margin`` (fastcontrast's option, not 6.2.0's): every entry whose similarity exceeds the
    row's positive similarity by more than the margin is left out, except the positive pair itself (in
    ``query_to_doc`` and ``doc_to_query``).

    ``queries`` [n, d] are this rank's; ``queries_all`` [N, d] and each of ``docs_all`` ([positives, neg_1, …],
    each [N, d]) are every rank's rows (the local ones when not gathered), this rank's starting at ``offset``.
    """
    n = queries.shape[0]
    world = queries_all.shape[0]
    local = torch.arange(offset, offset + n, device=queries.device)
    rows = torch.arange(n, device=queries.device)
    docs_cat = torch.cat(docs_all, dim=0)
    local_docs = docs_all[0][local]
    sims = {"query_to_doc": similarity_fct(queries, docs_cat)}
    if "query_to_query" in directions:
        sims["query_to_query"] = similarity_fct(queries, queries_all)
        sims["query_to_query"][rows, local] = -torch.inf
    if "doc_to_query" in directions:
        sims["doc_to_query"] = similarity_fct(queries_all, local_docs).T
    if "doc_to_doc" in directions:
        same_query = torch.eye(world, device=queries.device)[local].repeat(1, len(docs_all)).bool()
        sims["doc_to_doc"] = similarity_fct(docs_cat, local_docs).T.masked_fill(same_query, -torch.inf)
    if false_negative_margin is not None:
        threshold = sims["query_to_doc"].detach()[rows, local].unsqueeze(1) + false_negative_margin
        for key, sim in sims.items():
            mask = sim.detach() > threshold
            if key in ("query_to_doc", "doc_to_query"):
                mask[rows, local] = False
            sims[key] = sim.masked_fill(mask, -torch.inf)
    penalty = None
    if hardness_mode is not None and hardness_strength > 0.0:
        penalty = hardness_strength * sims["query_to_doc"].detach()
        own = torch.eye(world, device=queries.device, dtype=torch.bool)[local].repeat(1, len(docs_all))
        if hardness_mode == "hard_negatives":
            excluded = ~own
            excluded[:, :world] = True
        elif hardness_mode == "in_batch_negatives":
            excluded = own
        else:
            excluded = own
            excluded[:, world:] = False
        penalty = penalty.masked_fill(excluded, 0.0)
    logits = {key: value * scale for key, value in sims.items()}
    if penalty is not None:
        logits["query_to_doc"] = logits["query_to_doc"] + penalty
    positives = logits["query_to_doc"][rows, local]
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(logits.values()), dim=1), dim=1)
    else:
        log_z = sum(torch.logsumexp(m, dim=1) for m in logits.values()) / len(logits)
    return -(positives - log_z).mean()


def gist_loss_reference(
    columns: list,
    guide_columns: list,
    local_positives: torch.Tensor,
    local_positive_guides: torch.Tensor,
    temperature: float,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    *,
    offset: int = 0,
) -> torch.Tensor:
    """sentence-transformers 6.2.0 ``GISTEmbedLoss.forward`` after the embeddings, full matrices.

    ``columns`` / ``guide_columns``: [anchors (local), positives, negatives?] with the positives and negatives
    every rank's rows (the local ones when not gathered), this rank's starting at ``offset``;
    ``local_positives`` / ``local_positive_guides``: this rank's positive rows.
    """

    def cos(x, y):
        return F.cosine_similarity(x.unsqueeze(1), y.unsqueeze(0), dim=-1)

    anchor, positive = columns[0], columns[1]
    anchor_guide, positive_guide = guide_columns[0], guide_columns[1]
    n = anchor.shape[0]
    guided_positive = cos(anchor_guide, positive_guide).diagonal(offset=offset).view(-1, 1)
    if margin_strategy == "absolute":
        threshold = guided_positive - margin
    else:
        threshold = guided_positive - guided_positive.abs() * margin
    rows = torch.arange(n, device=anchor.device)

    def masked(guide_sim, sim, protect=False):
        mask = guide_sim > threshold
        if protect:
            mask[rows, offset + rows] = False
        return sim.masked_fill(mask, -torch.inf)

    scores = [masked(cos(anchor_guide, positive_guide), cos(anchor, positive), protect=True)]
    if contrast_anchors:
        scores.append(masked(cos(anchor_guide, anchor_guide), cos(anchor, anchor)))
    if contrast_positives:
        scores.append(masked(cos(local_positive_guides, positive_guide), cos(local_positives, positive)))
    if len(columns) == 3:
        scores.append(masked(cos(anchor_guide, guide_columns[2]), cos(anchor, columns[2])))
    logits = torch.cat(scores, dim=1) / temperature
    return F.cross_entropy(logits, torch.arange(offset, offset + n, device=anchor.device))
