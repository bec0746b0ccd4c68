"""The storage behind horizontal fusion: one tensor per fused operand, members' rows
are views of it.

A fused GEMM (passes/fuse_horizontal.py) reads its group's weights as one [ΣN, K]
tensor. `RowStorage` builds that tensor once by concatenating the members' buffers and
then re-points each member's buffer to its row slice, so the model holds the bytes
once, the eager forward and `fuse_delta` (which writes in place) keep working on their
own rows, and the fused GEMM sees every in-place edit. On each call it checks that
every member still holds the exact view it was given (same object, same storage): a
buffer replaced since (`module.to(device)`, `load_state_dict(assign=True)`, a swapped
tensor) rebuilds the group from the members' current tensors. Biases are parameters
whose identity optimizers and peft may hold on to, so they are not re-pointed: the
group keeps a small concatenated copy, rebuilt when a member bias changes (identity,
storage or version).
"""

from __future__ import annotations

import torch
from torch import nn

Slot = tuple[nn.Module, str]  # (owner module, attribute name)


class RowStorage:
    """The concatenated operands of one fused group; see the module docstring."""

    def __init__(self, operands: list[list[Slot]]) -> None:
        self.operands = operands  # per operand (weight, scale[, bias]): member slots
        self._views: list[list[torch.Tensor]] | None = None  # what members hold now
        self._fused: list[torch.Tensor] = []
        self._bias_key: tuple | None = None

    def tensors(self, device: torch.device) -> list[torch.Tensor] | None:
        """The group's operands on `device`; None when a member is elsewhere (the
        unfused graph then runs)."""
        current = [[getattr(owner, attr) for owner, attr in slots] for slots in self.operands]
        if any(t is None or t.device != device for ts in current for t in ts):
            return None
        if not self._holds_views(current):
            self._rebuild(current)
        bias_key = self._key(current[2]) if len(current) == 3 else None
        if bias_key != self._bias_key:
            with torch.inference_mode(False), torch.no_grad():
                self._fused[2:] = [torch.cat([b.detach() for b in current[2]])]
            self._bias_key = bias_key
        return self._fused

    def _holds_views(self, current: list[list[torch.Tensor]]) -> bool:
        if self._views is None:
            return False
        return all(
            t is v and t.data_ptr() == v.data_ptr()
            for ts, vs in zip(current[:2], self._views, strict=True)
            for t, v in zip(ts, vs, strict=True)
        )

    def _rebuild(self, current: list[list[torch.Tensor]]) -> None:
        """Concatenate the weight and scale buffers; members get row views."""
        # Built outside inference mode: the views become module buffers, which
        # `fuse_delta` later writes in place.
        with torch.inference_mode(False), torch.no_grad():
            fused = [torch.cat([t.detach() for t in ts]) for ts in current[:2]]
        views = []
        for whole, slots in zip(fused, self.operands, strict=False):
            start, pointed = 0, []
            for owner, attr in slots:
                rows = getattr(owner, attr).shape[0]
                view = whole[start : start + rows]
                owner._buffers[attr] = view
                pointed.append(view)
                start += rows
            views.append(pointed)
        self._views, self._fused = views, fused
        self._bias_key = None

    @staticmethod
    def _key(tensors: list[torch.Tensor]) -> tuple:
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


def slots_are_buffers(operands: list[list[Slot]]) -> bool:
    """The weight and scale of every member are plain buffers (what re-pointing needs)."""
    return all(attr in owner._buffers for slots in operands[:2] for owner, attr in slots)


def shares_storage(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is part of a larger storage (a fused group's row view)."""
    return tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
