"""lightly 1.6's memory bank (``MemoryBankModule``) state: a FIFO of fp32 unit vectors.

Kept apart from the loss math: the loss reads the bank (a [K, D] tensor) and then, only if the query
requires grad, the keys of this batch are enqueued, exactly in lightly's order and with its wrap-around
rule (a batch that reaches the end fills the tail and the rest of that batch is dropped).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from fastcontrast import distributed
from fastcontrast._validation import compiling


class MemoryBank(nn.Module):
    """FIFO bank of negatives, lightly-compatible.

    Args:
        size: ``(K, D)``, or 0 to disable the bank. As in lightly 1.6, a bare int K > 0 is an error: the
            feature dimension is required (lightly 1.4 guessed it from the first batch, which breaks
            distributed training), and so is anything that is not 0 or a pair of non-negative ints.
    """

    def __init__(self, size: Union[int, Sequence[int]]):
        super().__init__()
        if not isinstance(size, (int, tuple, list, torch.Size)):
            raise TypeError(f"`memory_bank_size` must be 0 or a tuple (K, D) of ints, got {size!r}.")
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if isinstance(size, bool):
            raise ValueError(f"`memory_bank_size` must be 0 or a tuple (K, D) of ints, got {size!r}.")
        if any(isinstance(x, bool) or not isinstance(x, int) for x in size_tuple):
            raise TypeError(f"`memory_bank_size` must be 0 or a tuple (K, D) of ints, got {size!r}.")
        if any(x < 0 for x in size_tuple):
            raise ValueError(f"Illegal memory bank size `memory_bank_size`={size!r}: all entries must be non-negative.")
        if isinstance(size, int) and size > 0:
            raise ValueError(
                f"Memory bank size `memory_bank_size`={size} does not specify the feature dimension. Set it with "
                f"'memory_bank_size=({size}, dim)', or pass 0 to disable the memory bank (lightly 1.6's rule)."
            )
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise ValueError(
                f"Illegal memory bank size `memory_bank_size`={size!r}: expected a (num_features, dim) tuple, or 0 "
                "to disable the bank."
            )
        self.size = size_tuple
        self.register_buffer("bank", torch.empty(size=self.size, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        self._ptr = 0
        if len(size_tuple) == 2:
            self._init_bank()

    @property
    def enabled(self) -> bool:
        return self.size[0] > 0

    @torch.no_grad()
    def _init_bank(self) -> None:
        # Same RNG draws as lightly (torch.randn of the bank's shape, then normalised), so a seeded run
        # starts from the same bank.
        self.bank = nn.functional.normalize(torch.randn(self.size).type_as(self.bank), dim=-1).to(self.bank.device)
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=self.bank_ptr.device)
        self._ptr = 0

    def read(self) -> torch.Tensor:
        """The bank as it is now: [K, D] fp32, a detached copy."""
        return self.bank.clone().detach()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Dequeue the oldest entries and add ``keys`` ([b, D]); lightly's wrap-around rule."""
        batch_size = keys.shape[0]
        # The pointer is mirrored as a Python int: reading the buffer back would sync the host every step.
        ptr = self._ptr
        stop = min(ptr + batch_size, self.size[0])
        new_keys = keys[: stop - ptr].detach().to(self.bank.dtype)
        if compiling():
            # Under torch.compile (inductor, torch 2.13) an in-place write into the bank also changed the copy
            # this step's loss had read and saved for backward, giving wrong gradients; a new bank tensor
            # cannot alias it. Eager keeps the cheaper in-place write of b rows.
            self.bank = torch.cat([self.bank[:ptr], new_keys, self.bank[stop:]])
        else:
            self.bank[ptr:stop] = new_keys
        self._ptr = 0 if ptr + batch_size >= self.size[0] else stop
        self.bank_ptr.fill_(self._ptr)

    @torch.no_grad()
    def enqueue_from_all_ranks(self, keys: torch.Tensor, process_group=None) -> None:
        """lightly's ``gather_distributed`` update: enqueue the keys of every rank, in rank order.

        Every rank then holds the same bank. Ranks may hold different numbers of keys. Without an initialised
        process group (or in a group of one) this is :meth:`enqueue`.

        Args:
            keys: [b, D] this rank's normalised keys.
            process_group: the group to gather over (None: the default group).
        """
        group = distributed.resolve_gather_group(True, process_group, what="NTXentLoss memory bank")
        if group is not None:
            keys = distributed.gather_keys_for_memory_bank(keys, group, what="NTXentLoss memory bank")
        self.enqueue(keys)
