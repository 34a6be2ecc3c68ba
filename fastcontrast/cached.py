"""The gradient-cached training step (docs/cached_step.md): a batch's memory is one chunk's activations plus O(N·d).

    cache = GradCache([image_encoder, text_encoder], ClipLoss(), chunk_size=256)
    optimizer.zero_grad()
    loss = cache.step(images, texts, loss_args=(model.logit_scale.exp(),))
    optimizer.step()

A step has three phases:

1. **Embed** every input in chunks of ``chunk_size`` rows under ``no_grad``, saving the RNG state before each
   chunk's forward (:class:`ChunkedForward`).
2. **Loss once** over the whole batch: the embeddings are leaf tensors, the loss's extra arguments
   (``logit_scale.exp()``, ``logit_bias``) are replaced by detached leaves too, and one ``autograd.grad``
   gives the gradient of the (scaled) loss w.r.t. every embedding and every extra argument
   (:func:`loss_gradients`). Under DDP the loss's own collectives run once per step.
3. **Re-forward** each chunk with its RNG state restored and backpropagate its slice of the cached embedding
   gradients; the extra arguments' gradients go back through their own graph (to ``logit_scale``,
   ``logit_bias``) in the last chunk's backward, the one DDP synchronises (:meth:`ChunkedForward.backward`).

Every parameter's ``.grad`` then receives what ``loss.backward()`` over the whole batch would have added, when
that batch's forward ran the same chunks in the same order: the dropout masks are draws from the RNG stream,
so they are the chunked forward's masks, not those of one monolithic forward. Without randomness in the
encoders the two are the same function. BatchNorm is the exception: it sees per-chunk statistics (a warning,
or an error with ``strict=True``).

Phases 1 and 3 do not assume two towers: :class:`ChunkedForward` takes any number of inputs, each through
its own or a shared encoder, and an encoder may return several embeddings per call (open_clip's model returns
both towers' features). The sentence-transformers Cached* losses are phase 1, their loss on the embeddings,
and phases 2-3 on the same objects.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

Encoder = Callable[..., Any]
AutocastFactory = Callable[[], ContextManager]

__all__ = ["ChunkedForward", "GradCache", "PartialGradientError", "loss_gradients", "split_extra_arguments"]


class PartialGradientError(RuntimeError):
    """A chunk's re-forward or backward failed after some of the step's gradients were accumulated.

    The parameters' ``.grad`` hold part of this step's gradient: zero them before the next step. The original
    exception is the ``__cause__``.
    """


def _check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"`chunk_size` must be a positive int (rows per chunk), got {type(chunk_size).__name__} "
                        f"({chunk_size!r}).")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1 (rows per chunk), got {chunk_size}.")
    return chunk_size


def _encoder_name(index: int, encoder: Encoder) -> str:
    owner = getattr(encoder, "__self__", None)
    if isinstance(owner, nn.Module):
        what = f"{type(owner).__name__}.{getattr(encoder, '__name__', 'forward')}"
    elif isinstance(encoder, nn.Module):
        what = type(encoder).__name__
    else:
        what = getattr(encoder, "__qualname__", type(encoder).__name__)
    return f"encoder {index} ({what})"


def _modules_of(encoder: Encoder) -> List[nn.Module]:
    """The modules an encoder visibly runs: itself, or the module of a bound method. A plain function that
    calls a model hides it (pass the DDP module as ``ddp_modules`` then)."""
    if isinstance(encoder, nn.Module):
        return [encoder]
    owner = getattr(encoder, "__self__", None)
    return [owner] if isinstance(owner, nn.Module) else []


def _values_of(batch: object) -> list:
    """The values of one input: a tensor alone, a tuple/list's items, or a mapping's values."""
    if isinstance(batch, Mapping):
        return list(batch.values())
    return list(batch) if isinstance(batch, (tuple, list)) else [batch]


def _batch_rows(index: int, batch: object) -> int:
    """The leading dimension shared by every tensor of input ``index`` (a tensor, a tuple/list, or a mapping)."""
    rows = {value.shape[0] for value in _values_of(batch) if isinstance(value, torch.Tensor) and value.dim() > 0}
    if len(rows) != 1:
        raise ValueError(
            f"input {index} must be a tensor, or a tuple/list/mapping of tensors with one common batch size "
            f"(dim 0), got {type(batch).__name__} with batch sizes {sorted(rows) or 'none'}."
        )
    (count,) = rows
    if count == 0:
        raise ValueError(f"input {index} is an empty batch (0 rows).")
    return count


def _slice_rows(batch: object, rows: slice, count: int) -> object:
    """Rows ``rows`` of every tensor in ``batch`` whose dim 0 is the batch; other values pass unchanged."""

    def cut(value):
        return value[rows] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count else value

    if isinstance(batch, Mapping):
        return {key: cut(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(cut(value) for value in batch)
    return cut(batch)


def _call(encoder: Encoder, chunk: object) -> object:
    # A tuple/list input is the encoder's positional arguments (open_clip's model(images, texts)); a tensor or
    # a mapping is its one argument (sentence-transformers' model(features)).
    return encoder(*chunk) if isinstance(chunk, tuple) else encoder(chunk)


def _embeddings_of(name: str, output: object, rows: int) -> Tuple[torch.Tensor, ...]:
    """Check an encoder's output for a chunk of ``rows`` rows: a floating tensor [rows, ...], or a tuple/list
    of them (several embeddings per call)."""
    outputs = tuple(output) if isinstance(output, (tuple, list)) else (output,)
    if not outputs:
        raise ValueError(f"{name} returned an empty {type(output).__name__}; expected a tensor [{rows}, dim].")
    for position, tensor in enumerate(outputs):
        label = name if len(outputs) == 1 else f"{name} output {position}"
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{label} returned {type(tensor).__name__}; expected a floating-point tensor "
                            f"[{rows}, dim] (or a tuple of them).")
        if not tensor.is_floating_point() or tensor.dim() < 1 or tensor.shape[0] != rows:
            raise ValueError(f"{label} returned a {tensor.dtype} tensor of shape {tuple(tensor.shape)} for a chunk "
                             f"of {rows} rows; expected a floating-point tensor [{rows}, dim].")
    return outputs


def _cuda_devices(inputs: Sequence[object], modules: Sequence[nn.Module]) -> List[int]:
    """CUDA devices whose generators a chunk's forward may draw from: those of its inputs and parameters.

    Only when CUDA is already initialised (as torch.utils.checkpoint does): a CPU step never touches CUDA.
    """
    if not torch.cuda.is_initialized():
        return []
    devices = set()
    for batch in inputs:
        devices.update(v.device.index for v in _values_of(batch) if isinstance(v, torch.Tensor) and v.is_cuda)
    for module in modules:
        devices.update(p.device.index for p in module.parameters() if p.is_cuda)
    return sorted(d if d is not None else torch.cuda.current_device() for d in devices)


def _no_progress(chunks: Sequence[Any], desc: str) -> Sequence[Any]:
    return chunks


class _RngState:
    """The CPU generator's state and those of the CUDA devices in use, taken before a chunk's forward.

    ``cpu_slot``: a uint8 row to keep the CPU state in (see :class:`ChunkedForward`), or None for its own tensor.
    """

    def __init__(self, cuda_devices: Sequence[int], cpu_slot: Optional[torch.Tensor] = None):
        state = torch.get_rng_state()
        self.cpu = state if cpu_slot is None or cpu_slot.shape != state.shape else cpu_slot.copy_(state)
        self.cuda_devices = list(cuda_devices)
        self.cuda = [torch.cuda.get_rng_state(device) for device in self.cuda_devices]

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body from this state, then put every generator back where it was (``fork_rng``): the
        re-forward draws the embedding pass's dropout masks and leaves the RNG stream where phase 1 left it."""
        with torch.random.fork_rng(devices=self.cuda_devices):
            # A copy: torch 2.13's set_rng_state crashes (SIGSEGV) on a row of a larger buffer (offset > 0).
            torch.set_rng_state(self.cpu.clone())
            for device, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


class _Chunk:
    __slots__ = ("input_index", "rows", "args", "rng", "shapes")

    def __init__(self, input_index: int, rows: slice, args: object, rng: _RngState, shapes: List[torch.Size]):
        self.input_index, self.rows, self.args, self.rng, self.shapes = input_index, rows, args, rng, shapes


class ChunkedForward:
    """Phases 1 and 3 of the cached step for one batch: embed in chunks without grad, later re-forward each
    chunk with its RNG replayed and backpropagate cached gradients.

    Args:
        encoders: one callable per input, or one callable shared by every input (the two views of NT-Xent,
            the anchor/positive columns of a sentence-transformers batch). An encoder receives a chunk of its
            input (``encoder(*chunk)`` for a tuple/list input, ``encoder(chunk)`` for a tensor or a mapping) and
            returns a floating tensor ``[rows, dim]``, or a tuple of them.
        inputs: the batch per input: a tensor ``[n, ...]``, a tuple/list of tensors with the same ``n`` (an
            encoder's positional arguments), or a mapping of them (e.g. tokenizer features). Values that are
            not tensors with the batch dimension are passed to every chunk unchanged.
        chunk_size: rows per chunk (>= 1).
        autocast: a zero-argument callable returning the context to run the forward passes in
            (``functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)``, open_clip's
            ``get_autocast(...)``); None: no autocast.
        ddp_modules: DistributedDataParallel modules the encoders run through that cannot be seen from them
            (an encoder that is a function calling a DDP model). Every encoder is taken to run through each.
            Encoders that are DDP modules, or bound methods of one, are found without this.
        split: how to cut one input into chunks, called as ``split(batch, chunk_size)`` for every input before
            any forward; returns ``(rows, chunk)`` pairs in order, ``rows`` the slice of the batch's rows the
            chunk holds (contiguous from 0) and ``chunk`` what the encoder gets. None: ``chunk_size`` rows of
            every tensor whose dim 0 is the batch. sentence-transformers' Cached* losses pass its own mini-batch
            slicing (padding trimmed per mini-batch, or packed by token count).
        progress: wraps the chunk loop of each phase, called as ``progress(chunks, desc)`` and iterated (e.g.
            ``lambda chunks, desc: tqdm.tqdm(chunks, desc=desc)``); None: no progress display.

    After construction, ``embeddings`` holds every embedding as a leaf ``[n, dim]`` tensor requiring grad, in
    input order (an encoder with k outputs contributes k consecutive embeddings).
    """

    def __init__(
        self,
        encoders: Union[Encoder, Sequence[Encoder]],
        inputs: Sequence[object],
        chunk_size: int,
        *,
        autocast: Optional[AutocastFactory] = None,
        ddp_modules: Sequence[DistributedDataParallel] = (),
        split: Optional[Callable[[object, int], Sequence[Tuple[slice, object]]]] = None,
        progress: Optional[Callable[[Sequence[Any], str], Iterable[Any]]] = None,
    ):
        self.chunk_size = _check_chunk_size(chunk_size)
        if not isinstance(inputs, (tuple, list)) or not inputs:
            raise ValueError(f"`inputs` must be a non-empty sequence of batches, got {type(inputs).__name__}.")
        if callable(encoders):
            encoders = [encoders] * len(inputs)
        encoders = list(encoders)
        if len(encoders) != len(inputs) or not all(callable(e) for e in encoders):
            raise ValueError(f"`encoders` must be one callable or one callable per input ({len(inputs)}), got "
                             f"{len(encoders)} item(s) of types {[type(e).__name__ for e in encoders]}.")
        self.encoders = encoders
        self.names = [_encoder_name(i, e) for i, e in enumerate(encoders)]
        self.autocast = autocast if autocast is not None else contextlib.nullcontext
        self.progress = progress if progress is not None else _no_progress
        self._ddp_of_input = [
            {id(m): m for m in (*_modules_of(e), *ddp_modules) if isinstance(m, DistributedDataParallel)}
            for e in encoders
        ]
        modules = [m for e in encoders for m in _modules_of(e)] + list(ddp_modules)

        # Every input is cut before the first forward: a bad batch fails before any work, and a module that
        # edits its features in place (sentence-transformers' Pooling on prompts) cannot move the boundaries.
        pieces = [(index, rows, args) for index, batch in enumerate(inputs)
                  for rows, args in self._split(index, batch, split)]
        cuda_devices = _cuda_devices([args for _, _, args in pieces], modules)

        # One leaf per embedding; chunk c of input i fills rows c of embeddings first[i] ... first[i] + k_i - 1.
        # Each chunk's output is copied into its rows as soon as it exists and then freed: the embedding pass
        # holds the N rows once (a list of chunks and their torch.cat would hold them twice, and the freed
        # chunks would stay in the CPU allocator's heap).
        counts = [_batch_rows(index, batch) for index, batch in enumerate(inputs)]
        # Every chunk's CPU generator state (5 KiB for torch's default generator) in one buffer: one small
        # tensor per chunk would sit between the chunks' outputs in the CPU allocator's heap and keep it from
        # reusing their space (measured: 2-3 MiB more resident heap for 128 chunks, for 0.6 MiB of states).
        cpu_state = torch.get_rng_state()
        cpu_states = cpu_state.new_empty((len(pieces), cpu_state.numel()))
        del cpu_state
        self.chunks: List[_Chunk] = []
        self.embeddings: List[torch.Tensor] = []
        self._first_embedding: List[int] = []
        with torch.no_grad():
            for index, rows, args in self.progress(pieces, "Embedding chunks (no grad)"):
                rng = _RngState(cuda_devices, cpu_states[len(self.chunks)])
                with self.autocast():
                    chunk_out = _embeddings_of(self.names[index], _call(self.encoders[index], args),
                                               rows.stop - rows.start)
                if rows.start == 0:
                    self._first_embedding.append(len(self.embeddings))
                    self.embeddings += [t.new_empty((counts[index], *t.shape[1:])) for t in chunk_out]
                mine = self.embeddings[self._first_embedding[index]:]  # inputs come in order: this one's are last
                self._check_like_first_chunk(index, rows, chunk_out, mine)
                for embedding, tensor in zip(mine, chunk_out):
                    embedding[rows] = tensor
                self.chunks.append(_Chunk(index, rows, args, rng, [t.shape for t in chunk_out]))
                del chunk_out
        for embedding in self.embeddings:
            embedding.requires_grad_()
        self.embedding_shapes = [e.shape for e in self.embeddings]

    def _check_like_first_chunk(self, index: int, rows: slice, chunk_out: Tuple[torch.Tensor, ...],
                                embeddings: List[torch.Tensor]) -> None:
        """Every chunk of an input must give as many embeddings as its first, of the same dtype and width."""
        def described(tensors):
            return [(str(t.dtype), tuple(t.shape[1:])) for t in tensors]

        if described(chunk_out) != described(embeddings):
            raise ValueError(f"{self.names[index]} returned embeddings (dtype, shape after the rows) "
                             f"{described(chunk_out)} for rows {rows.start}:{rows.stop} but {described(embeddings)} "
                             f"for rows 0:{min(self.chunk_size, embeddings[0].shape[0])}.")

    def _split(self, index: int, batch: object, split) -> List[Tuple[slice, object]]:
        """The chunks of input ``index``: ``split``'s, checked to cover rows 0, 1, ... in order, or rows of
        ``chunk_size``."""
        if split is None:
            count = _batch_rows(index, batch)
            return [(rows, _slice_rows(batch, rows, count))
                    for rows in (slice(start, min(start + self.chunk_size, count))
                                 for start in range(0, count, self.chunk_size))]
        pieces = list(split(batch, self.chunk_size))
        expected = 0
        for rows, _ in pieces:
            if not isinstance(rows, slice) or rows.start != expected or not rows.stop > rows.start \
                    or rows.step not in (None, 1):
                raise ValueError(f"`split` must return (rows, chunk) pairs whose rows are non-empty, contiguous "
                                 f"slices from 0; for input {index} it returned {rows!r} where a slice starting at "
                                 f"{expected} was due.")
            expected = rows.stop
        if not pieces:
            raise ValueError(f"`split` returned no chunks for input {index} (an empty batch?).")
        return pieces

    def release_embeddings(self) -> None:
        """Drop this object's references to the embeddings once their gradients are known: the re-forward needs
        only the gradients, so phase 3 holds N·d numbers fewer (if nothing else holds the embeddings)."""
        self.embeddings = []

    def _sync_plan(self) -> List[List[DistributedDataParallel]]:
        """Per chunk, the DDP modules to hold in ``no_sync()``: each module synchronises in the backward of the
        last chunk that runs through it, and only there (its reducer all-reduces the accumulated ``.grad``)."""
        last_use: Dict[int, int] = {}
        for position, chunk in enumerate(self.chunks):
            for key in self._ddp_of_input[chunk.input_index]:
                last_use[key] = position
        return [
            [m for key, m in self._ddp_of_input[chunk.input_index].items() if last_use[key] != position]
            for position, chunk in enumerate(self.chunks)
        ]

    def backward(
        self,
        embedding_grads: Sequence[torch.Tensor],
        extra_tensors: Sequence[torch.Tensor] = (),
        extra_grads: Sequence[torch.Tensor] = (),
    ) -> None:
        """Phase 3: re-forward every chunk with its RNG state restored and backpropagate its rows of
        ``embedding_grads`` (one per embedding, same shapes), accumulating into the parameters' ``.grad``.

        ``extra_tensors`` (graph-carrying tensors outside the encoders, e.g. ``logit_scale.exp()``) are
        backpropagated with ``extra_grads`` in the last chunk's backward, the one DDP synchronises.

        Raises PartialGradientError (the cause chained) when a chunk fails: gradients are then partial.
        """
        if len(embedding_grads) != len(self.embedding_shapes):
            raise ValueError(f"`embedding_grads` must hold one gradient per embedding ({len(self.embedding_shapes)}), "
                             f"got {len(embedding_grads)}.")
        for position, (grad, shape) in enumerate(zip(embedding_grads, self.embedding_shapes)):
            if not isinstance(grad, torch.Tensor) or grad.shape != shape:
                raise ValueError(f"`embedding_grads[{position}]` must be a tensor of shape {tuple(shape)}, got "
                                 f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}.")
        plan = self._sync_plan()
        last = len(self.chunks) - 1
        backpropagated = False
        for position, chunk in enumerate(self.progress(self.chunks, "Re-forward and backward")):
            name = self.names[chunk.input_index]
            try:
                with contextlib.ExitStack() as stack:
                    for module in plan[position]:
                        stack.enter_context(module.no_sync())
                    with chunk.rng.replayed(), self.autocast():
                        outputs = _embeddings_of(name, _call(self.encoders[chunk.input_index], chunk.args),
                                                 chunk.rows.stop - chunk.rows.start)
                    if [t.shape for t in outputs] != chunk.shapes:
                        raise ValueError(
                            f"{name} returned shapes {[tuple(t.shape) for t in outputs]} in the re-forward of rows "
                            f"{chunk.rows.start}:{chunk.rows.stop} but {[tuple(s) for s in chunk.shapes]} in the "
                            "embedding pass: the encoder must be deterministic given its RNG state."
                        )
                    first = self._first_embedding[chunk.input_index]
                    tensors = list(outputs)
                    grads = [embedding_grads[first + k][chunk.rows] for k in range(len(outputs))]
                    if position == last:
                        tensors += list(extra_tensors)
                        grads += list(extra_grads)
                    keep = [i for i, t in enumerate(tensors) if t.requires_grad]
                    if keep:
                        torch.autograd.backward([tensors[i] for i in keep], [grads[i] for i in keep])
                        backpropagated = True
            except Exception as exc:
                done = f"{position} of {len(self.chunks)} chunks" + (" and none of the extra arguments"
                                                                      if extra_tensors else "")
                raise PartialGradientError(
                    f"GradCache: the re-forward/backward of {name}, rows {chunk.rows.start}:{chunk.rows.stop}, failed "
                    f"({type(exc).__name__}: {exc}). This step's gradients are partial ({done} were backpropagated "
                    "into .grad): zero them (optimizer.zero_grad()) before the next step."
                ) from exc
        if not backpropagated:
            # What loss.backward() says for a graph without parameters, instead of a silent no-op step.
            raise ValueError("GradCache: no encoder output and no extra argument of the loss requires grad: there "
                             "is no gradient to compute (are the encoders' parameters frozen?).")

    def defer_backward(self, loss: torch.Tensor, embedding_grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """``loss`` as a new leaf whose ``backward()`` runs phase 3, for trainers that call
        ``loss = loss_fn(batch); loss.backward()`` after phases 1 and 2 ran inside ``loss_fn`` (the contract of
        sentence-transformers' Cached* losses, which do the same with a hook on a detached loss).

        When autograd reaches the returned tensor, :meth:`backward` runs with ``embedding_grads`` (one per
        embedding) times the gradient arriving there: the trainer's division for gradient accumulation and a
        GradScaler's scale reach every chunk. The re-forward runs in grad mode, which autograd turns off
        inside hooks. Each ``backward()`` through the returned tensor runs phase 3 once more.
        """
        grads = list(embedding_grads)
        result = loss.detach().requires_grad_()

        def reforward(upstream: torch.Tensor) -> None:
            with torch.enable_grad():
                self.backward([grad * upstream for grad in grads])

        result.register_hook(reforward)
        return result


def split_extra_arguments(args: Sequence[object], kwargs: Mapping[str, object]):
    """Replace every tensor in ``args`` / ``kwargs`` that requires grad by a detached leaf copy.

    Returns ``(args, kwargs, originals, leaves)``: the arguments for the loss, and the graph-carrying tensors
    with their leaves in matching order (a tensor passed twice gets one leaf). Containers (tuple, list, dict)
    are searched recursively.
    """
    leaves_by_id: Dict[int, torch.Tensor] = {}
    originals: List[torch.Tensor] = []
    leaves: List[torch.Tensor] = []

    def swap(value):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            if id(value) not in leaves_by_id:
                leaves_by_id[id(value)] = value.detach().requires_grad_()
                originals.append(value)
                leaves.append(leaves_by_id[id(value)])
            return leaves_by_id[id(value)]
        if isinstance(value, (tuple, list)):
            return type(value)(swap(v) for v in value)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}, originals, leaves


def total_loss(output: object) -> torch.Tensor:
    """The scalar a training loop backpropagates: the loss itself, or the sum of the terms that require grad
    of a tuple/list/dict output (open_clip sums its loss dict; accuracies and constants carry no gradient)."""
    if isinstance(output, torch.Tensor):
        terms = [output]
    elif isinstance(output, Mapping):
        terms = [v for v in output.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    elif isinstance(output, (tuple, list)):
        terms = [v for v in output if isinstance(v, torch.Tensor) and v.requires_grad]
    else:
        raise TypeError(f"the loss returned {type(output).__name__}; expected a tensor, or a tuple/list/dict of them.")
    if not terms or not all(t.requires_grad for t in terms):
        raise ValueError("the loss does not depend on any embedding or extra argument that requires grad: there is "
                         "no gradient to cache.")
    for term in terms:
        if term.numel() != 1:
            raise ValueError(f"the loss must be a scalar (or a collection of scalars), got a term of shape "
                             f"{tuple(term.shape)}.")
    return terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])


def loss_gradients(
    loss: torch.Tensor, embeddings: Sequence[torch.Tensor], extra_leaves: Sequence[torch.Tensor]
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Phase 2: the gradient of a scalar ``loss`` (already scaled by a GradScaler, if any) w.r.t. every
    embedding leaf and extra-argument leaf. An input the loss does not use gets zeros, so the re-forward still
    runs every chunk (DDP expects every rank's backward)."""
    inputs = [*embeddings, *extra_leaves]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return grads[: len(embeddings)], grads[len(embeddings):]


def _detached(output: object) -> object:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, Mapping):
        return {k: _detached(v) for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(_detached(v) for v in output)
    return output


class GradCache:
    """The gradient-cached training step for any fastcontrast loss (or any loss over embeddings).

    ``step(*inputs)`` embeds each input in chunks of ``chunk_size`` rows without grad, computes the loss once
    over the whole batch, then re-forwards chunk by chunk (RNG replayed) backpropagating the cached gradients.
    Every parameter's ``.grad`` receives what the full-batch ``loss.backward()`` adds (accumulating into
    existing ``.grad``), for a forward that ran the same chunks; peak memory is one chunk's activations plus
    O(N·d) for the embeddings and their gradients.

    Args:
        encoders: one callable or module per input, or one shared by every input. Each returns a floating
            tensor ``[rows, dim]`` (or a tuple of them) for a chunk; see :class:`ChunkedForward`.
        loss: the loss module (``ClipLoss``, ``SigLipLoss``, ``DistillClipLoss``, ``NTXentLoss``, ``DCLLoss``,
            ``DCLWLoss``, ``SupConLoss``, ...) or any callable; called as
            ``loss(*embeddings, *loss_args, **loss_kwargs)``. A tuple/dict output is summed over its terms that
            require grad, as open_clip does.
        chunk_size: rows per chunk (>= 1).
        autocast: zero-argument callable returning the autocast context for the forward passes and the loss
            (e.g. ``functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)``); None: none.
        scaler: a ``torch.amp.GradScaler``: the loss is scaled before its gradients are cached, so the
            parameters' ``.grad`` carry the scale and ``scaler.step(optimizer); scaler.update()`` work as usual.
        strict: raise instead of warning when an encoder holds BatchNorm in training mode.
        ddp_modules: DDP modules the encoders call that cannot be seen from them; see :class:`ChunkedForward`.
    """

    def __init__(
        self,
        encoders: Union[Encoder, Sequence[Encoder]],
        loss: Callable[..., Any],
        chunk_size: int,
        *,
        autocast: Optional[AutocastFactory] = None,
        scaler: Optional[Any] = None,
        strict: bool = False,
        ddp_modules: Sequence[DistributedDataParallel] = (),
    ):
        self.chunk_size = _check_chunk_size(chunk_size)
        if not callable(loss):
            raise TypeError(f"`loss` must be a loss module or callable, got {type(loss).__name__}.")
        if not callable(encoders) and not (isinstance(encoders, (tuple, list)) and encoders):
            raise TypeError(f"`encoders` must be a callable or a non-empty sequence of callables, got "
                            f"{type(encoders).__name__}.")
        if not isinstance(strict, bool):
            raise TypeError(f"`strict` must be a bool, got {type(strict).__name__}.")
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(f"`scaler` must be a torch.amp.GradScaler (or None), got {type(scaler).__name__}.")
        self.encoders = encoders
        self.loss = loss
        self.autocast = autocast
        self.scaler = scaler
        self.strict = strict
        self.ddp_modules = tuple(ddp_modules)

    def _check_batch_norm(self) -> None:
        encoders = self.encoders if isinstance(self.encoders, (tuple, list)) else [self.encoders]
        modules = [m for e in encoders for m in _modules_of(e)] + list(self.ddp_modules)
        found = sorted({f"{type(layer).__name__}" for m in modules for layer in m.modules()
                        if isinstance(layer, _BatchNorm) and layer.training})
        if not found:
            return
        message = (f"GradCache: the encoders hold {', '.join(found)} in training mode. Its batch statistics become "
                   f"per-chunk statistics (chunks of {self.chunk_size} rows, not the whole batch), and its running "
                   "statistics are updated twice per chunk (embedding pass and re-forward), so the step is not the "
                   "full-batch step. Use LayerNorm/GroupNorm, eval-mode BatchNorm, or chunk_size >= batch size.")
        if self.strict:
            raise ValueError(message + " (raised because strict=True)")
        warnings.warn(message, stacklevel=3)

    def step(
        self,
        *inputs: object,
        loss_args: Sequence[object] = (),
        loss_kwargs: Optional[Mapping[str, object]] = None,
    ) -> object:
        """One cached step: accumulate the batch's gradient into ``.grad``; return the loss, detached.

        Args:
            inputs: the batch of each encoder, in the order the loss takes the embeddings (images, texts; or
                view 0, view 1; or embeddings alone for SupCon). Tensors ``[n, ...]``, tuples of tensors (an
                encoder's positional arguments) or mappings of tensors.
            loss_args, loss_kwargs: the loss's arguments after the embeddings (``logit_scale.exp()``,
                ``logit_bias``, labels, teacher features). Tensors that require grad get their gradient
                through their own graph, as in a full-batch backward.

        Returns the loss's output (tensor, tuple or dict, as the loss returns it), detached. The optimizer
        step is the caller's (``optimizer.step()``, or ``scaler.step(optimizer); scaler.update()``).
        """
        if not inputs:
            raise ValueError("GradCache.step needs at least one input batch.")
        self._check_batch_norm()
        forward = ChunkedForward(self.encoders, inputs, self.chunk_size, autocast=self.autocast,
                                 ddp_modules=self.ddp_modules)
        args, kwargs, originals, leaves = split_extra_arguments(tuple(loss_args), dict(loss_kwargs or {}))
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            output = self.loss(*forward.embeddings, *args, **kwargs)
        total = total_loss(output)
        scaled = self.scaler.scale(total) if self.scaler is not None else total
        embedding_grads, extra_grads = loss_gradients(scaled, forward.embeddings, leaves)
        result = _detached(output)
        del output, total, scaled, args, kwargs, leaves
        forward.release_embeddings()
        forward.backward(embedding_grads, originals, extra_grads)
        return result
