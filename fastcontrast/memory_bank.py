"""lightly 1.6's memory bank (``MemoryBankModule``) state: a FIFO of fp32 unit vectors.

Kept apart from the loss math: the loss reads the bank (a [K, D] tensor) and then, only if the query
requires grad, the keys of this batch are enqueued, exactly in lightly's order and with its wrap-around
rule (a batch that reaches the end fills the tail and the rest of that batch is dropped).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from fastcontrast import distributed
from fastcontrast._validation import compiling


class MemoryBank(nn.Module):
    """FIFO bank of negatives, lightly-compatible.

    Args:
        size: ``(K, D)``, or an int K (the dim D is then taken from the first batch, with lightly's
            warning). ``K == 0`` disables the bank.
    """

    def __init__(self, size: Union[int, Sequence[int]]):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(isinstance(x, bool) or not isinstance(x, int) for x in size_tuple) or len(size_tuple) not in (1, 2):
            raise ValueError(f"`memory_bank_size` must be an int K or a tuple (K, D) of ints, got {size!r}.")
        if any(x < 0 for x in size_tuple):
            raise ValueError(f"`memory_bank_size` entries must be non-negative, got {size!r}.")
        self.size = size_tuple
        self.register_buffer("bank", torch.empty(size=self.size, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        self._ptr = 0
        if isinstance(size, int) and size > 0:
            warnings.warn(
                f"Memory bank size 'size={size}' does not specify feature dimension. It is recommended to set "
                "the feature dimension with 'size=(n, dim)' when creating the memory bank. Distributed training "
                "might fail if the feature dimension is not set.",
                UserWarning,
                stacklevel=3,
            )
        else:
            self._init_bank(None)

    @property
    def enabled(self) -> bool:
        return self.size[0] > 0

    @torch.no_grad()
    def _init_bank(self, dim: Optional[int]) -> None:
        # Same RNG draws as lightly (torch.randn of the bank's shape, then normalised), so a seeded run
        # starts from the same bank.
        size = self.size if dim is None else (self.size[0], dim)
        self.bank = nn.functional.normalize(torch.randn(size).type_as(self.bank), dim=-1).to(self.bank.device)
        self.bank_ptr = torch.zeros(1, dtype=torch.long, device=self.bank_ptr.device)
        self._ptr = 0

    def read(self, keys: torch.Tensor) -> torch.Tensor:
        """The bank as it is now ([K, D] fp32, a detached copy), initialising it lazily if needed."""
        if self.bank.dim() == 1:
            self._init_bank(keys.shape[1])
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
