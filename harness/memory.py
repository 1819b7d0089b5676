"""Keeping a quick-tier run's peak resident memory down (the conv DPSOM's posterior head alone is
64.6 M parameters: 246 MiB per float32 copy, 493 MiB per float64 copy).

A run needs up to six copies of a model's weights per side (weights, gradients, two Adam slots, in
float32 and float64), and the reference's values long after they are computed (the port's float64
twin, which measures the port's noise floor, runs last). The tools:

* :class:`Spill`: dicts of arrays written to a temporary directory (``np.save`` per large array) and
  read back lazily, one array per access (memory-mapped, or copied: :func:`for_side`), so a value
  needed later is not resident in between and a reader holds one tensor at a time. The directory
  (a ``tempfile.TemporaryDirectory``) is removed by :meth:`Spill.close`.
* :func:`zeros_as_views` / :func:`fresh`: all-zero arrays (an optimizer's state before its first
  step) kept as read-only zero-strided views of one zero, handed out again as new ``np.zeros``.
* :func:`release`: collect garbage and hand the C heap's free pages back to the operating system;
  :func:`return_freed_blocks`: large blocks go back to it as soon as they are freed (the CLI's setting).

Nothing here changes a value: every array read back is bit-identical to the one written.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

SPILL_MIN_BYTES = 1 << 20  # arrays from 1 MiB on go to disk; smaller values stay in memory


def as_zero_view(value: Any) -> Any:
    """An all-zero float array as a read-only zero-strided view of one zero (no memory); else ``value``."""
    if isinstance(value, np.ndarray) and value.ndim and value.dtype.kind == "f" and value.size and not value.any():
        return np.broadcast_to(np.zeros((), value.dtype), value.shape)
    return value


def zeros_as_views(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every all-zero float array replaced by :func:`as_zero_view`'s view."""
    return {k: as_zero_view(v) for k, v in state.items()}


def fresh(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every zero-strided view of :func:`zeros_as_views` replaced by a new writable
    ``np.zeros`` (allocated lazily by the OS: pages only read stay unbacked), for a side that may keep
    or write into what it is given."""
    return {k: np.zeros(v.shape, v.dtype) if isinstance(v, np.ndarray) and v.ndim and 0 in v.strides and not v.flags.writeable else v
            for k, v in state.items()}


def return_freed_blocks(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more from its own memory map, so
    that freeing it returns the memory to the OS at once (``mallopt(M_MMAP_THRESHOLD)``; this also
    stops glibc from raising the threshold after large frees, which otherwise leaves freed tensors of
    up to 32 MiB in the heap, resident: measured +0.6 GB after one float64 backward pass of the conv
    DPSOM). Process-wide; True where it took effect (glibc), False elsewhere."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def for_side(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """``values`` to hand to a side (which may keep or write into an array): a :class:`SpillView`
    reads in-memory copies, not read-only memory maps."""
    return values.copied() if isinstance(values, SpillView) else values


def release() -> None:
    """Collect garbage, then return the C heap's free pages to the OS (glibc ``malloc_trim``; a no-op
    elsewhere). Freed memory otherwise stays in the process's heap and counts as resident."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Spill:
    """Named dicts of arrays on disk: ``put(key, values)``, ``get(key)`` -> a read-only lazy mapping.

    Large C-contiguous arrays (at least ``SPILL_MIN_BYTES``) go to ``.npy`` files; everything else
    (scalars, small or non-contiguous arrays) stays in memory as given. ``get(key)`` opens a file on
    each access (``copy=False``: a read-only memory map, resident only while the caller holds it;
    ``copy=True``: an in-memory copy, for a consumer that may keep or write to it)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="parity-spill-")
        self._entries: dict[str, tuple[list[str], dict[str, Any], dict[str, str]]] = {}
        self._n = 0

    def put(self, key: str, values: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        """``values``: a dict, or its items, each written before the next is taken (a side's streamed
        snapshot: one array in memory at a time)."""
        small, files, order = {}, {}, []
        for name, v in values.items() if isinstance(values, Mapping) else values:
            order.append(name)
            if isinstance(v, np.ndarray) and type(v) is np.ndarray and v.nbytes >= SPILL_MIN_BYTES and v.flags.c_contiguous:
                path = os.path.join(self._dir.name, f"{self._n}.npy")
                self._n += 1
                np.save(path, v, allow_pickle=False)
                files[name] = path
            else:
                small[name] = v
            del v
        self._entries[key] = (order, small, files)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str, copy: bool = False) -> SpillView:
        return SpillView(*self._entries[key], copy)

    def drop(self, key: str) -> None:
        """Forget ``key`` and delete its files."""
        _, _, files = self._entries.pop(key)
        for path in files.values():
            os.remove(path)

    def close(self) -> None:
        self._entries.clear()
        self._dir.cleanup()


class SpillView(Mapping):
    """One spilled dict, in its original order; each access reads its array from disk afresh."""

    def __init__(self, order: list[str], small: dict[str, Any], files: dict[str, str], copy: bool) -> None:
        self._order, self._small, self._files, self._copy = order, small, files, copy

    def __getitem__(self, name: str) -> Any:
        if name in self._small:
            v = self._small[name]
            return v.copy() if self._copy and isinstance(v, np.ndarray) else v
        if self._copy:  # read into memory of its own: no file mapping, whose read pages would count as resident too
            return np.load(self._files[name], allow_pickle=False)
        return np.load(self._files[name], mmap_mode="r", allow_pickle=False)

    @property
    def fresh(self) -> bool:
        """Whether each access gives a new array that nothing else holds (``copy=True``)."""
        return self._copy

    def __contains__(self, name: object) -> bool:
        return name in self._small or name in self._files

    def copied(self) -> SpillView:
        """The same dict, each access an in-memory copy."""
        return SpillView(self._order, self._small, self._files, True)

    def mapped(self) -> SpillView:
        """The same dict, each access a read-only memory map (a shape or dtype read without the data)."""
        return SpillView(self._order, self._small, self._files, False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def resident_mib() -> float:
    """This process's resident memory now (``VmRSS``; 0 where /proc is absent), MiB."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0
