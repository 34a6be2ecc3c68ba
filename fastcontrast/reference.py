"""Naive full-matrix losses: the ground truth for tests and benchmarks.

Each function reproduces the original library's math line for line, in the input dtype, materialising the
full logits matrix exactly as the original does (that is the point: it is what fastcontrast replaces).

- :func:`clip_loss_reference`: open_clip 3.x ``ClipLoss.forward`` for one process.
- :func:`siglip_loss_reference`: open_clip 3.x ``SigLipLoss._loss`` for one process.
- :func:`nt_xent_loss_reference`: lightly 1.6 ``NTXentLoss.forward`` without a memory bank.
- :func:`dcl_loss_reference`: lightly 1.6 ``DCLLoss`` / ``DCLWLoss`` for one process.
- :func:`nt_xent_memory_bank_loss_reference`: lightly 1.6 ``NTXentLoss.forward`` with a memory bank
  (the bank tensor is passed in; reading and enqueueing it is :class:`fastcontrast.memory_bank.MemoryBank`).
- :func:`mnrl_loss_reference`: sentence-transformers 6.2.0 ``MultipleNegativesRankingLoss`` (any similarity).
- :func:`gist_loss_reference`: sentence-transformers 6.2.0 ``GISTEmbedLoss`` from embeddings.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

Scale = Union[torch.Tensor, float]


def clip_logits_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``ClipLoss.get_logits`` for world_size 1: two [n, m] and [m, n] logits matrices."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    return logits_per_image, logits_per_text


def clip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale] = None,
) -> torch.Tensor:
    """open_clip 3.x ``ClipLoss`` (one process): ½[CE(s·I·Tᵀ + b, arange) + CE(s·T·Iᵀ + b, arange)].

    Args:
        image_features: [n, d]; text_features: [n, d]; both already normalised by the model.
        logit_scale: the *exponentiated* scale (open_clip passes ``logit_scale.exp()``), not clamped here.
        logit_bias: optional scalar added to every logit; it cannot change the value.
    Returns:
        0-dim loss in the logits' dtype.
    """
    logits_per_image, logits_per_text = clip_logits_reference(
        image_features, text_features, logit_scale, logit_bias
    )
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device, dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale] = None,
    *,
    positive_offset: int = 0,
) -> torch.Tensor:
    """open_clip 3.x ``SigLipLoss`` (one process): −Σᵢⱼ log σ(zᵢⱼ·(s·Iᵢ·Tⱼ + b)) / n.

    ``zᵢⱼ = +1`` where ``j == i + positive_offset`` and −1 elsewhere. The division is by the number of
    image rows ``n``, not by n·m (open_clip's choice, reproduced).

    Args:
        image_features: [n, d]; text_features: [m, d].
    Returns:
        0-dim loss in the logits' dtype.
    """
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n, m = logits.shape
    labels = -torch.ones((n, m), device=logits.device, dtype=logits.dtype)
    rows = torch.arange(n, device=logits.device)
    cols = rows + positive_offset
    in_range = (cols >= 0) & (cols < m)
    labels[rows[in_range], cols[in_range]] = 1
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


def lightly_normalize(x: torch.Tensor) -> torch.Tensor:
    """lightly's ``nn.functional.normalize(x, dim=1)`` (eps 1e-12), in the input dtype."""
    return F.normalize(x, dim=1)


def nt_xent_loss_reference(out0: torch.Tensor, out1: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """lightly 1.6 ``NTXentLoss`` without memory bank, one process.

    Both views are normalised; each of the 2n rows is scored against the other 2n−1 rows, and the loss is
    the mean cross-entropy over the 2n rows.

    Args:
        out0, out1: [n, d] projections of two views of the same n images.
    Returns:
        0-dim loss.
    """
    batch_size = out0.shape[0]
    out0 = lightly_normalize(out0)
    out1 = lightly_normalize(out1)
    diag_mask = torch.eye(batch_size, device=out0.device, dtype=torch.bool)
    logits_00 = torch.einsum("nc,mc->nm", out0, out0) / temperature
    logits_01 = torch.einsum("nc,mc->nm", out0, out1) / temperature
    logits_10 = torch.einsum("nc,mc->nm", out1, out0) / temperature
    logits_11 = torch.einsum("nc,mc->nm", out1, out1) / temperature
    logits_00 = logits_00[~diag_mask].view(batch_size, -1)
    logits_11 = logits_11[~diag_mask].view(batch_size, -1)
    logits = torch.cat([torch.cat([logits_01, logits_00], dim=1), torch.cat([logits_10, logits_11], dim=1)], dim=0)
    labels = torch.arange(batch_size, device=out0.device, dtype=torch.long).repeat(2)
    return F.cross_entropy(logits, labels)


def nt_xent_memory_bank_loss_reference(
    out0: torch.Tensor, out1: torch.Tensor, bank: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """lightly 1.6 ``NTXentLoss`` with a memory bank (MoCo-style), one process.

    One direction only: logits ``[q·k⁺ | q·bankᵀ] / τ`` with label 0; no in-batch negatives.

    Args:
        out0: [n, d] queries; out1: [n, d] keys (positives).
        bank: [K, d] negatives, read *before* this batch is enqueued; never receives a gradient.
    Returns:
        0-dim loss.
    """
    out0 = lightly_normalize(out0)
    out1 = lightly_normalize(out1)
    negatives = bank.detach().to(out0.device).T
    sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
    # lightly's einsum would reject a half-precision query against the fp32 bank; compare in the
    # common dtype instead, which is what any working run of the original does (fp32).
    dtype = torch.promote_types(out0.dtype, negatives.dtype)
    sim_neg = torch.einsum("nc,ck->nk", out0.to(dtype), negatives.to(dtype))
    logits = torch.cat([sim_pos.to(dtype), sim_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], device=out0.device, dtype=torch.long)
    return F.cross_entropy(logits, labels)


def clip_loss_local_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_image_features: torch.Tensor,
    all_text_features: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale] = None,
    *,
    offset: int,
) -> torch.Tensor:
    """open_clip 3.x ``ClipLoss`` with ``local_loss=True`` on one rank, given the gathered features.

    ``logits_per_image = s·I_local·T_allᵀ (+b)``, ``logits_per_text = s·T_local·I_allᵀ (+b)``, labels
    ``arange(n) + offset`` (open_clip's ``n·rank``; the sum of the lower ranks' sizes when they differ).

    Args:
        image_features, text_features: [n, d] this rank's features.
        all_image_features, all_text_features: [N, d] every rank's features in rank order.
    Returns:
        0-dim loss: the mean over this rank's rows, in the logits' dtype.
    """
    logits_per_image = logit_scale * image_features @ all_text_features.T
    logits_per_text = logit_scale * text_features @ all_image_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(image_features.shape[0], device=image_features.device, dtype=torch.long) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def nt_xent_loss_gathered_reference(
    z0: torch.Tensor,
    z1: torch.Tensor,
    z0_all: torch.Tensor,
    z1_all: torch.Tensor,
    temperature: float,
    *,
    offset: int,
) -> torch.Tensor:
    """lightly 1.6 ``NTXentLoss(gather_distributed=True)`` on one rank, given the gathered normalised views.

    Each local row is scored against both gathered views except itself (lightly's ``eye_rank`` mask, at
    column ``offset + i``); the positive of row i is at column ``offset + i`` of the other view.

    Args:
        z0, z1: [n, d] this rank's views, already normalised (lightly normalises before gathering).
        z0_all, z1_all: [N, d] every rank's views in rank order (lightly's ``out0_large``, ``out1_large``).
        offset: this rank's first row in the gathered views (lightly's ``rank·n``).
    Returns:
        0-dim loss: the mean over this rank's 2n rows.
    """
    batch_size = z0.shape[0]
    rows = torch.arange(batch_size, device=z0.device)
    diag_mask = torch.zeros((batch_size, z0_all.shape[0]), dtype=torch.bool, device=z0.device)
    diag_mask[rows, rows + offset] = True
    logits_00 = torch.einsum("nc,mc->nm", z0, z0_all) / temperature
    logits_01 = torch.einsum("nc,mc->nm", z0, z1_all) / temperature
    logits_10 = torch.einsum("nc,mc->nm", z1, z0_all) / temperature
    logits_11 = torch.einsum("nc,mc->nm", z1, z1_all) / temperature
    logits_00 = logits_00[~diag_mask].view(batch_size, -1)
    logits_11 = logits_11[~diag_mask].view(batch_size, -1)
    logits_0100 = torch.cat([logits_01, logits_00], dim=1)
    logits_1011 = torch.cat([logits_10, logits_11], dim=1)
    logits = torch.cat([logits_0100, logits_1011], dim=0)
    labels = (rows + offset).repeat(2)
    return F.cross_entropy(logits, labels)


def dcl_loss_gathered_reference(
    z0: torch.Tensor,
    z1: torch.Tensor,
    z0_all: torch.Tensor,
    z1_all: torch.Tensor,
    temperature: float,
    weight_fn=None,
    *,
    offset: int = 0,
) -> torch.Tensor:
    """lightly 1.6 ``DCLLoss`` (``DCLWLoss`` with its weight_fn) on one rank, given the normalised views.

    For each view: −w·(positive logit) + LSE over the logits against both gathered views without the own
    column ``offset + i`` of either (self and positive both leave the denominator); mean over rows; the two
    views averaged.

    Args:
        z0, z1: [n, d] this rank's views, already normalised.
        z0_all, z1_all: [N, d] every rank's views in rank order (z0, z1 for one process).
        weight_fn: ``weight_fn(z0, z1)`` → weights of the positive terms, or None.
        offset: this rank's first row in the gathered views (lightly's ``eye_rank``).
    Returns:
        0-dim loss.
    """
    batch_size = z0.shape[0]
    rows = torch.arange(batch_size, device=z0.device)
    diag_mask = torch.zeros((batch_size, z0_all.shape[0]), dtype=torch.bool, device=z0.device)
    diag_mask[rows, rows + offset] = True

    def one_view(a, b, a_all, b_all):
        sim_aa = torch.einsum("nc,mc->nm", a, a_all) / temperature
        sim_ab = torch.einsum("nc,mc->nm", a, b_all) / temperature
        positive_loss = -sim_ab[diag_mask]
        if weight_fn:
            positive_loss = positive_loss * weight_fn(a, b)
        sim_aa = sim_aa[~diag_mask].view(batch_size, -1)
        sim_ab = sim_ab[~diag_mask].view(batch_size, -1)
        negative_loss = torch.logsumexp(torch.cat([sim_aa, sim_ab], dim=1), dim=1)
        return (positive_loss + negative_loss).mean()

    return 0.5 * (one_view(z0, z1, z0_all, z1_all) + one_view(z1, z0, z1_all, z0_all))


def dcl_loss_reference(out0: torch.Tensor, out1: torch.Tensor, temperature: float = 0.1, weight_fn=None):
    """lightly 1.6 ``DCLLoss`` / ``DCLWLoss`` for one process: both views normalised, then
    :func:`dcl_loss_gathered_reference` with the local views as the gathered ones.

    Args:
        out0, out1: [n, d] projections of two views of the same n images.
    Returns:
        0-dim loss.
    """
    z0, z1 = lightly_normalize(out0), lightly_normalize(out1)
    return dcl_loss_gathered_reference(z0, z1, z0, z1, temperature, weight_fn)


def distill_logits_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    all_image_features: Optional[torch.Tensor] = None,
    all_text_features: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip 3.x ``ClipLoss.get_logits`` without bias: one process, or the local loss of one rank.

    One process: ``s·I·Tᵀ`` and ``s·T·Iᵀ``. Local loss, given every rank's gathered features:
    ``s·I·T_allᵀ`` and ``s·T·I_allᵀ``. (The gathered global loss is the one-process loss of the gathered
    features.)
    """
    if all_image_features is None:
        return logit_scale * image_features @ text_features.T, logit_scale * text_features @ image_features.T
    return logit_scale * image_features @ all_text_features.T, logit_scale * text_features @ all_image_features.T


def distill_clip_loss_from_logits_reference(
    logits_per_image: torch.Tensor,
    logits_per_text: torch.Tensor,
    dist_logits_per_image: torch.Tensor,
    dist_logits_per_text: torch.Tensor,
    *,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip 3.x ``DistillClipLoss.forward`` after ``get_logits``: (contrastive loss, distill loss).

    distill = ½ Σ over both directions of −(softmax(teacher) · log_softmax(student)).sum(1).mean(); labels
    are ``arange(rows) + offset`` (open_clip's ``rows·rank`` for the local loss).
    """
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device, dtype=torch.long) + offset

    def dist_loss(teacher_logits, student_logits):
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    contrastive = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    distill = (dist_loss(dist_logits_per_image, logits_per_image)
               + dist_loss(dist_logits_per_text, logits_per_text)) / 2
    return contrastive, distill


def distill_clip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    dist_image_features: torch.Tensor,
    dist_text_features: torch.Tensor,
    dist_logit_scale: Scale,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip 3.x ``DistillClipLoss`` (one process): (contrastive loss, distill loss).

    Args:
        image_features, text_features: [n, d] student features; logit_scale: the student's exponentiated scale.
        dist_image_features, dist_text_features: [n, d_t] teacher features (d_t may differ from d);
            dist_logit_scale: the teacher's exponentiated scale.
    Returns:
        two 0-dim losses in the logits' dtype.
    """
    student = distill_logits_reference(image_features, text_features, logit_scale)
    teacher = distill_logits_reference(dist_image_features, dist_text_features, dist_logit_scale)
    return distill_clip_loss_from_logits_reference(*student, *teacher)


def caption_loss_reference(logits: torch.Tensor, labels: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """open_clip 3.x ``CoCaLoss``'s caption part: ``CrossEntropyLoss(ignore_index=pad_id)`` over tokens.

    Args:
        logits: [n, L, V] token logits; labels: [n, L] int64 token ids.
    """
    return F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=pad_id)


def supcon_pairs_reference(labels, ref_labels, indices_tuple=None) -> tuple:
    """PML's ``convert_to_pairs``: (a1, p, a2, n) from a miner's pairs or triplets, else all label pairs.

    Without a tuple: positives are equal labels, negatives different ones; (i, i) leaves the positives when
    the reference labels are the labels tensor itself (PML's identity check).
    """
    if indices_tuple is not None:
        if len(indices_tuple) == 4:
            return tuple(indices_tuple)
        a, p, n = indices_tuple
        return a, p, a, n
    if ref_labels is None:
        ref_labels = labels
    matches = (labels.unsqueeze(1) == ref_labels.unsqueeze(0)).byte()
    diffs = matches ^ 1
    if ref_labels is labels:
        matches.fill_diagonal_(0)
    a1, p = torch.where(matches)
    a2, n = torch.where(diffs)
    return a1, p, a2, n


def supcon_anchor_losses_reference(mat: torch.Tensor, pairs: tuple, temperature: float, *, inverted: bool = True):
    """PML's ``GenericPairLoss.mat_based_loss`` + ``SupConLoss._compute_loss`` on a full [n, m] matrix.

    Args:
        mat: similarities (``inverted``) or distances, [n, m]. pairs: (a1, p, a2, n) as from
            :func:`supcon_pairs_reference`.
    Returns:
        The per-anchor losses [n] (PML's "element" losses), or None where PML returns its zero losses (at
        most one positive and one negative pair, or no positive or no negative pair at all).
    """
    a1, p, a2, n = pairs
    if all(len(x) <= 1 for x in pairs):
        return None
    pos_mask, neg_mask = torch.zeros_like(mat), torch.zeros_like(mat)
    pos_mask[a1, p] = 1
    neg_mask[a2, n] = 1
    if torch.any((pos_mask != 0) & (neg_mask != 0)):
        raise ValueError("Each pair should be either be positive or negative")
    if not (pos_mask.bool().any() and neg_mask.bool().any()):
        return None
    if not inverted:
        mat = -mat
    mat = mat / temperature
    mat_max, _ = mat.max(dim=1, keepdim=True)
    mat = mat - mat_max.detach()
    keep = (pos_mask + neg_mask).bool()
    denominator = torch.logsumexp(mat.masked_fill(~keep, -torch.finfo(mat.dtype).max), dim=1, keepdim=True)
    denominator = denominator.masked_fill(~torch.any(keep, dim=1, keepdim=True), 0)
    log_prob = mat - denominator
    mean_log_prob_pos = (pos_mask * log_prob).sum(dim=1) / (pos_mask.sum(dim=1) + torch.finfo(mat.dtype).tiny)
    return -mean_log_prob_pos


def cosine_similarity_reference(embeddings: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
    """PML's default ``CosineSimilarity()(embeddings, ref_emb)``: [n, m]."""
    return F.normalize(embeddings, p=2, dim=1) @ F.normalize(ref_emb, p=2, dim=1).T


def supcon_loss_reference(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float = 0.1,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    indices_tuple: Optional[tuple] = None,
    distance=None,
) -> torch.Tensor:
    """pytorch-metric-learning 2.x ``SupConLoss(temperature, distance=...)(embeddings, labels, indices_tuple,
    ref_emb, ref_labels)`` with its default reducer.

    Similarities (PML's default: cosine) over τ. Positives of anchor i: same label, itself excluded when
    there is no separate reference set (or ``ref_labels is labels``), or the mined positive pairs; the
    softmax runs over positives and negatives. Per anchor: −mean over positives of log-softmax; the loss
    averages the anchors whose loss is > 0 (PML's AvgNonZeroReducer), and is 0 (``sum(embeddings·0)``)
    where PML returns its zero losses.

    Args:
        embeddings: [n, d]; labels: [n] int (may be None with ``indices_tuple``); ref_emb: [m, d] or None;
            ref_labels: [m] or None; indices_tuple: a miner's (a1, p, a2, n) pairs or (a, p, n) triplets;
            distance: a PML distance (anything called as ``distance(embeddings, ref_emb)`` with an
            ``is_inverted`` attribute), None for cosine similarity.
    Returns:
        0-dim loss in the embeddings' dtype.
    """
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    pairs = supcon_pairs_reference(labels, ref_labels, indices_tuple)
    if all(len(x) <= 1 for x in pairs):
        return torch.sum(embeddings * 0)
    if distance is None:
        mat, inverted = cosine_similarity_reference(embeddings, ref_emb), True
    else:
        mat, inverted = distance(embeddings, ref_emb), distance.is_inverted
    losses = supcon_anchor_losses_reference(mat, pairs, temperature, inverted=inverted)
    if losses is None:
        return torch.sum(embeddings * 0)
    nonzero = losses > 0
    if nonzero.sum() >= 1:
        return losses[nonzero].mean()
    return torch.sum(embeddings * 0)


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
