"""One module-level scratch workspace per device, shared by every layer and every step.

Kernels take their temporaries (split-KV partial outputs, log-sum-exps, dequantized tiles) from
here instead of allocating per layer or per call. A buffer only grows, geometrically, so once it
is large enough its address stays fixed (what CUDA-graph capture of a decode step needs).
"""

from __future__ import annotations

import torch

__all__ = ["Workspace", "get_workspace", "workspaces"]


class Workspace:
    """Named, grow-only scratch buffers on one device."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[str, tuple] = {}  # name -> (shape, dtype, view): the last view handed out
        self._zeroed: set[str] = set()  # names of buffers zero-filled at allocation
        self.grow_count = 0

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, zeroed: bool = False) -> torch.Tensor:
        """A view `shape` of the buffer `name` (contents undefined). Reused across calls: the same view
        object as the last call's for the same shape and dtype (a decode step asks every layer for the
        same shapes), so no tensor is made on the hot path. `zeroed`: the buffer is zero-filled when it
        is allocated, and never again: for users that leave it all zeros after each use (decode's
        per-head counters), so every view of it starts at zero."""
        shape = tuple(shape)
        if zeroed != (name in self._zeroed) and name in self._buffers:
            raise ValueError(f"workspace buffer {name!r} was allocated with zeroed={not zeroed}")
        last = self._views.get(name)
        if last is not None and last[0] == shape and last[1] == dtype:
            return last[2]
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * dtype.itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            # 1.5x headroom: a context that grows token by token re-allocates O(log n) times.
            size = max(nbytes, int(1.5 * buf.numel()) if buf is not None else 0)
            del buf
            self._buffers.pop(name, None)
            buf = (torch.zeros if zeroed else torch.empty)(size, dtype=torch.uint8, device=self.device)
            self._buffers[name] = buf
            if zeroed:  # (a name never changes kind: checked above)
                self._zeroed.add(name)
            self.grow_count += 1
        view = buf[:nbytes].view(dtype).view(shape)
        self._views[name] = (shape, dtype, view)
        return view

    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()
        self._zeroed.clear()


_WORKSPACES: dict[torch.device, Workspace] = {}


def _key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def get_workspace(device) -> Workspace:
    """The workspace of `device` (created on first use); `cuda` means the current CUDA device."""
    key = _key(device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = Workspace(key)
    return _WORKSPACES[key]


def workspaces() -> dict[torch.device, Workspace]:
    """All workspaces created so far, by device."""
    return dict(_WORKSPACES)
