"""The samples of a request: one per --num-samples (seeds seed, seed+1, ...) or one per manifest row, each with its
own request (the row applied, its seed), resolved options and output name; every row is checked before compute."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastmaisi.pipelines.manifest import ManifestRow, bad_rows_message


@dataclass
class Sample:
    """One output set to make: `index` is its position in the job (sample i belongs to shard i mod N)."""

    index: int
    stem: str
    request: Any  # GenerateRequest of this sample alone: num_samples 1, seed = this sample's seed
    opts: dict
    line: int | None = None  # manifest line
    mask_sha256: str | None = None


def plan_samples(request, resolve: Callable, rows: list[ManifestRow] | None = None,
                 manifest: str | Path | None = None) -> list[Sample]:
    """Every sample of `request` (or of the manifest `rows` on top of it), validated by `resolve` (the CLI's).
    Raises ValueError naming every bad manifest line."""
    if rows is None:
        _, opts = resolve(request)
        sha = _mask_sha(request.mask)
        return [Sample(i, f"sample_{request.seed + i:06d}", replace(request, seed=request.seed + i, num_samples=1),
                       opts, mask_sha256=sha) for i in range(request.num_samples)]
    if request.num_samples != 1:
        raise ValueError("--num-samples and --manifest: the manifest's rows are the samples; leave out --num-samples")
    samples, errors = [], []
    for j, row in enumerate(rows):
        if row.error:
            errors.append(f"line {row.line}: {row.error}")
            continue
        values = dict(row.values)
        seed = values.pop("seed", request.seed + j)
        try:
            sample_request = replace(request, **values, seed=seed, num_samples=1)
            with warnings.catch_warnings():  # field-of-view notes: once, for the command line's request
                warnings.simplefilter("ignore")
                _, opts = resolve(sample_request)
            if sample_request.mask and not Path(sample_request.mask).exists():
                raise ValueError(f"mask {sample_request.mask}: no such file or folder")
            if sample_request.mask_db and not Path(sample_request.mask_db).is_dir():
                raise ValueError(f"mask_db {sample_request.mask_db}: not a folder")
        except (ValueError, TypeError) as exc:
            errors.append(f"line {row.line}: {exc}")
            continue
        samples.append(Sample(j, row.name or f"sample_{seed:06d}", sample_request, opts, row.line,
                              _mask_sha(sample_request.mask)))
    repeated = [stem for stem, n in Counter(s.stem for s in samples).items() if n > 1]
    for stem in repeated:
        lines = [str(s.line) for s in samples if s.stem == stem]
        errors.append(f"lines {', '.join(lines)}: the same output name {stem} (give each a different seed or name)")
    if errors:
        raise ValueError(bad_rows_message(Path(manifest or "manifest"), errors))
    return samples


def _mask_sha(path) -> str | None:
    """SHA-256 of a mask input: a file, a folder of per-class masks, or several of them (one hash over all)."""
    if not path:
        return None
    from fastmaisi.segmentations.mask_input import sha256_input

    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    if not all(Path(p).exists() for p in paths):
        return None
    shas = [sha256_input(p) for p in paths]
    if len(shas) == 1:
        return shas[0]
    import hashlib

    return hashlib.sha256("".join(shas).encode()).hexdigest()
