"""Data tier (D): each side's own data path, fed the same raw arrays, compared bit for bit.

Every other tier feeds both sides one preprocessed batch, so a port whose own loader scales,
splits or orders the data differently passes them all. Here the raw dataset as distributed (uint8
images and integer labels; real MNIST when it is found offline, else the embedded ``digits``) goes
through each side's ``prepare_data`` (harness/protocols.py), once with ``validation=False`` and
once with ``True``, and every returned array (images as fed, labels, the training and evaluation
batch order as index rows) is compared element by element:

* ``D data: reference vs port``: the two sides against each other;
* ``D data: reference vs original rule`` and ``D data: port vs original rule``: each side against
  the spec's ``data_rule`` (the original's rule written out once more, from the model's spec), so
  a difference is attributed to the side that departs from the original;
* ``D data: raw input``: SHA-256 of each raw array (and whether it matches the pinned hash of the
  data set), and that neither side modified the copy it was given.

In a section "X vs Y", X is side A and Y side B of its rows' notes. Sections for
``validation=True`` carry the suffix `` (validation=True)``. Verdicts are bit-exact
(``compare_exact``): the same integers through the same rule give the same bytes, so this tier
has no noise floor. A FAIL carries what the difference looks like (:func:`explain`): the same
rows in another order (a shuffle, another split seed), another row count (a remainder batch kept,
another split size), each sample rescaled by its own factor (another per-sample normalisation),
or the share of rows that occur on both sides (another selection). A side without the capability
raises ``Unsupported`` and its sections are one SKIPPED row with the reason; a spec without a
``data_rule`` gets its rule sections SKIPPED the same way.

``python -m harness.tier_data --model MODEL [--variant VARIANT]`` prints the sections; exit status 1
on any FAIL.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from harness.compare import Comparison, compare_exact, format_table
from harness.engine import skipped, worst
from harness.protocols import PortSide, ReferenceSide, Unsupported
from harness.spec import ModelSpec

RAW_KEYS = ("x_train", "y_train", "x_test", "y_test")
PAD = -1  # fills the short last row of a batch-order array (a remainder batch kept)
SECTIONS = ("D data: reference vs port", "D data: reference vs original rule", "D data: port vs original rule")
RAW_SECTION = "D data: raw input"
VALIDATIONS = (False, True)
SCALE_SPREAD = 1e-6  # B/A within one sample: both are float32 roundings of exact quotients (<= 2^-23 each)


def section_name(base: str, validation: bool) -> str:
    return f"{base} (validation=True)" if validation else base


def batch_rows(batches: Iterable[Any], batch_size: int) -> np.ndarray:
    """Index batches -> int64 [n_batches, width], row i = batch i; ``width`` is ``batch_size`` (or the
    longest batch, if longer), a shorter batch padded with -1. Tensors are accepted (``np.asarray``)."""
    rows = [np.asarray(b).astype(np.int64).reshape(-1) for b in batches]
    width = max([batch_size, *(len(r) for r in rows)])
    out = np.full((len(rows), width), PAD, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def load_raw(dataset: str | None = None):
    """The raw data set the tier runs on (:func:`harness.data.offline_raw`)."""
    from harness.data import offline_raw

    return offline_raw(dataset)


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --- what a difference looks like ------------------------------------------------------------------

def _row_keys(a: np.ndarray) -> list[bytes]:
    flat = np.ascontiguousarray(a).reshape(len(a), -1)
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in flat]


def _per_sample_scale(a: np.ndarray, b: np.ndarray) -> str:
    """B = c_i * A for every sample i, with c_i varying across samples (one c for all is a constant)."""
    if a.dtype.kind != "f" or a.ndim < 2:
        return ""
    a64, b64 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    if not (np.isfinite(a64).all() and np.isfinite(b64).all()) or not np.array_equal(a64 == 0, b64 == 0):
        return ""
    factors = []
    for ra, rb in zip(a64, b64):
        nz = ra != 0
        if nz.any():
            r = rb[nz] / ra[nz]
            if np.max(np.abs(r / r[0] - 1)) > SCALE_SPREAD:
                return ""
            factors.append(float(r[0]))
    if not factors:
        return ""
    lo, hi = min(factors), max(factors)
    differ = sum(abs(f - 1) > SCALE_SPREAD for f in factors)
    if hi - lo <= SCALE_SPREAD * hi:
        return f"one constant ratio B/A = {lo:.6g} for every element (another normalisation constant)"
    return (f"each sample scaled by its own factor: B/A constant within a sample, {lo:.4g} to {hi:.4g} across samples "
            f"({differ} of {len(factors)} samples differ): another per-sample normalisation "
            "(e.g. a global constant instead of a per-sample statistic)")


def explain(a: Any, b: Any) -> str:
    """What a difference between ``a`` (side A) and ``b`` (side B) looks like, along the sample axis."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 0 or b.ndim == 0 or a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
        return ""
    if len(a) != len(b):
        return (f"{len(b)} rows on side B vs {len(a)} on side A: another count (a remainder batch kept or dropped, "
                "another split size?)")
    if a.ndim > 1:
        ka, kb = _row_keys(a), _row_keys(b)
        if sorted(ka) == sorted(kb):
            return "the same rows in another order: a shuffle, or another split seed"
    if np.array_equal(np.sort(a, axis=None), np.sort(b, axis=None)):
        return "the same values in another arrangement: a shuffle?"
    scaled = _per_sample_scale(a, b)
    if scaled:
        return scaled
    if a.dtype.kind == "f" and a.ndim > 1:  # samples (images): which of them both sides hold
        seen = set(ka)
        common = sum(k in seen for k in kb)
        return f"{common} of {len(b)} rows of side B occur on side A: another selection of samples (another split seed?)"
    if a.dtype.kind in "iub":  # labels, indices: which values both sides hold
        common = int(np.isin(b, a).sum())
        return f"{common} of {b.size} elements of side B occur on side A, in another arrangement: a shuffle, or another selection?"
    return ""


def compare_arrays(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> list[Comparison]:
    """Every name of ``a`` then of ``b``, bit for bit; a name on one side only is a FAIL."""
    out = []
    for name in [*a, *(k for k in b if k not in a)]:
        if name not in a or name not in b:
            nan = float("nan")
            out.append(Comparison(name, (), nan, nan, nan, (), nan, nan, nan, "FAIL",
                                  f"missing on side {'A' if name not in a else 'B'}"))
            continue
        r = compare_exact(name, a[name], b[name])
        if r.verdict == "FAIL":
            found = explain(a[name], b[name])
            if found:
                r = dataclasses.replace(r, note=f"{r.note}; {found}")
        out.append(r)
    return out


# --- the tier ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Failed:
    """A side's ``prepare_data`` (or the spec's ``data_rule``) that produced nothing: ``call`` and why."""

    call: str
    err: BaseException

    def row(self, who: str) -> Comparison:
        note = f"{who}: {type(self.err).__name__}: {self.err}"
        if isinstance(self.err, Unsupported):
            return skipped(self.call, note)
        nan = float("nan")
        return Comparison(self.call, (), nan, nan, nan, (), nan, nan, nan, "FAIL", f"raised; {note}")


def _produce(call: str, fn: Callable[..., Mapping[str, np.ndarray]], *args: Any) -> dict[str, np.ndarray] | _Failed:
    try:
        return dict(fn(*args))
    except Exception as err:  # noqa: BLE001 -- Unsupported is a SKIPPED row, anything else this tier's FAIL, named
        return _Failed(call, err)


def _section(a: dict | _Failed, b: dict | _Failed, labels: tuple[str, str]) -> list[Comparison]:
    for got, who in ((a, labels[0]), (b, labels[1])):
        if isinstance(got, _Failed):
            return [got.row(who)]
    return compare_arrays(a, b)  # type: ignore[arg-type]


def run(spec: ModelSpec, variant: str, *, seed: int = 0, dataset: str | None = None,
        make_port: Callable[[Any, str], PortSide] | None = None, make_reference: Callable[[Any], ReferenceSide] | None = None,
        overrides: Mapping[str, str] | None = None, validations: Iterable[bool] = VALIDATIONS) -> dict[str, list[Comparison]]:
    """The data tier for ``spec``'s ``variant``: section name -> rows (see the module docstring).

    ``make_port(config, dtype)`` builds the port (default: the spec's, float32); ``make_reference(config)``
    the reference (default: ``spec.make_data_reference``); ``overrides``: ``key=value`` config
    overrides for both. ``seed`` is accepted for the common tier signature; nothing here is random.
    """
    del seed
    cfg = spec.get_config(variant, overrides)
    raw = load_raw(dataset)
    arrays = {k: np.asarray(getattr(raw, k)) for k in RAW_KEYS}
    before = {k: sha256(v) for k, v in arrays.items()}  # exact bytes: a side writing into its copy shows
    reference = (make_reference or spec.make_data_reference)(cfg)
    port = (make_port or spec.make_port)(cfg, "float32")
    changed: dict[str, set[str]] = {k: set() for k in RAW_KEYS}  # raw key -> the sides that wrote into their copy

    def prepared(side: str, fn: Callable[..., Mapping[str, np.ndarray]], validation: bool) -> dict[str, np.ndarray] | _Failed:
        copy = {k: np.array(v) for k, v in arrays.items()}  # writable, and each side its own
        out = _produce("prepare_data", fn, copy, validation)
        for k, v in copy.items():
            if sha256(v) != before[k]:
                changed[k].add(side)
        return out

    sections: dict[str, list[Comparison]] = {}
    for validation in validations:
        ref = prepared("reference", reference.prepare_data, validation)
        prt = prepared("port", port.prepare_data, validation)
        rule = _produce("data_rule", spec.data_rule, {k: np.array(v) for k, v in arrays.items()}, cfg, validation)
        pairs = ((ref, prt, ("reference", "port")), (ref, rule, ("reference", "original rule")), (prt, rule, ("port", "original rule")))
        for base, (a, b, labels) in zip(SECTIONS, pairs):
            sections[section_name(base, validation)] = _section(a, b, labels)
        del ref, prt, rule, pairs  # one flag's arrays at a time
    return {RAW_SECTION: _raw_rows(raw, arrays, changed), **sections}


def _raw_rows(raw: Any, arrays: Mapping[str, np.ndarray], changed: Mapping[str, set[str]]) -> list[Comparison]:
    from harness.data import ARRAY_SHA256

    pinned = ARRAY_SHA256.get(raw.name, {})
    rows = []
    for k, a in arrays.items():
        changed_by = sorted(changed[k])
        known, content = pinned.get(k), raw.hashes[k]  # the data set's identity: uint8 bytes (labels as uint8 too)
        status = "matches the pinned hash" if known == content else ("no pinned hash" if known is None else f"pinned {known}")
        note = f"{raw.name}: sha256 {content} ({status}); {raw.source}"
        ok = not changed_by and (known is None or known == content)
        if changed_by:
            note = f"modified in place by {' and '.join(changed_by)}'s prepare_data; {note}"
        rows.append(Comparison(f"raw.{k}", tuple(a.shape), 0.0, 0.0, 0.0, (), 0.0, 0.0, 0.0, "PASS" if ok else "FAIL", note))
    return rows


def verdict(sections: Mapping[str, list[Comparison]]) -> str:
    return worst(r.verdict for rows in sections.values() for r in rows)


def main(argv: list[str] | None = None) -> int:
    from harness.spec import get_spec

    parser = argparse.ArgumentParser(
        prog="python -m harness.tier_data",
        description="Data tier: raw uint8 data through each side's own data path (prepare_data), every array "
                    "compared bit for bit between the sides and against the spec's rule of the original, "
                    "for validation=False and True. Exit status 1 on any FAIL.")
    parser.add_argument("--model", required=True, help="model spec name (harness/models/<name>.py)")
    parser.add_argument("--variant", default=None, help="the spec's variant (default: its first default variant)")
    parser.add_argument("--dataset", default=None,
                        help="raw data set (harness.data names: MNIST, fMNIST, digits, synthetic); default: MNIST if found "
                             "offline, else digits")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--config {item!r}: expected KEY=VALUE")
        overrides[key] = value
    try:
        spec = get_spec(args.model)
    except KeyError as err:
        parser.error(str(err.args[0]))
    variant = args.variant or (spec.default_variants or spec.variants)[0]
    if variant not in spec.variants:
        parser.error(f"--variant {variant!r}: {spec.name} has {', '.join(spec.variants)}")
    sections = run(spec, variant, dataset=args.dataset, overrides=overrides)
    for name, rows in sections.items():
        print(f"\n== {name}")
        print(format_table(rows))
    result = verdict(sections)
    print(f"\nverdict: {result}")
    return 1 if result == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
