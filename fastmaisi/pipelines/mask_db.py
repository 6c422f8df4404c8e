"""The reference's "candidate mask database" path: pick label maps from a folder by how well their grid fits."""

from __future__ import annotations

from pathlib import Path


def rank_candidates(folder: str | Path, size, spacing) -> list[Path]:
    """NIfTI label maps in `folder`, best first by the reference's score (find_masks.py):
    sum over axes of |FOV_c - FOV_req| / 10 + |dim_c - dim_req| / 100 + |spacing_c - spacing_req| (mm, voxels).

    Only headers are read. Raises ValueError when the folder holds no NIfTI file.
    """
    import nibabel as nib

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--mask-db {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise ValueError(f"--mask-db {folder}: no .nii/.nii.gz label maps in it")
    scored = []
    for path in files:
        try:
            header = nib.as_closest_canonical(nib.load(path)).header
        except Exception as exc:  # an unreadable candidate is skipped, as a corrupt file in a database would be
            raise ValueError(f"--mask-db: cannot read {path.name} ({exc})") from None
        dims, zooms = header.get_data_shape()[:3], header.get_zooms()[:3]
        score = sum(abs(d * z - n * s) / 10 + abs(d - n) / 100 + abs(z - s)
                    for d, z, n, s in zip(dims, zooms, size, spacing))
        scored.append((score, path))
    return [p for _, p in sorted(scored, key=lambda t: (t[0], t[1].name))]
