"""Preview PNG: axial | coronal | sagittal mid-slices with the labels blended in colour."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastmaisi.labels import BODY as BODY_LABEL
from fastmaisi.io.atomic import _staged, _write_file
from fastmaisi.io.volumes import _spacing, _volume, is_ct

WINDOWS = {"soft": (-160, 240), "lung": (-1350, 150), "bone": (-450, 1050)}  # HU [low, high] for previews
_OVERLAY_ALPHA = 0.45


def label_color(value: int) -> tuple[int, int, int]:
    """Fixed RGB colour of a label id: golden-angle hues, so neighbouring ids differ; 0 black, body skin-coloured."""
    if value == 0:
        return (0, 0, 0)
    if value == BODY_LABEL:
        return (241, 214, 145)
    hue = (value * 0.618033988749895) % 1.0
    sat = (0.85, 0.6, 0.75)[value % 3]
    val = (1.0, 0.8)[(value // 3) % 2]
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, sat, val))  # type: ignore[return-value]


def _window(image: np.ndarray, modality: str | int, window: str | tuple[float, float] | None) -> tuple[float, float]:
    if window is None:
        if is_ct(modality):
            return WINDOWS["soft"]
        sample = image[::4, ::4, ::4]
        lo, hi = np.percentile(sample, [0.5, 99.5]) if sample.size else (0.0, 1.0)
        return float(lo), float(max(hi, lo + 1))
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {sorted(WINDOWS)} or (low, high), got {window!r}")
        return WINDOWS[window]
    lo, hi = (float(w) for w in window)
    if not hi > lo:
        raise ValueError(f"window must have high > low, got {window!r}")
    return lo, hi


def preview_image(image: Any, label: Any = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  modality: str | int = "ct", window: str | tuple[float, float] | None = None,
                  max_panel: int = 512, min_panel: int = 256) -> Any:
    """PIL RGB image: axial | coronal | sagittal mid-slices (radiological view), labels alpha-blended in colour.

    Display pixels are isotropic, d = max(min(spacing), largest extent / max_panel) mm, so the aspect is right; a
    small volume is enlarged until its largest extent spans `min_panel` pixels (the demo's 64^3 would be thumbnails).
    Axial: anterior up, patient right on the left; coronal: superior up, right on the left; sagittal: superior up,
    anterior on the left. Panels are top-aligned on black, 4 px apart. Body (200) is not tinted.
    """
    img = _volume(image, "image")
    lab = None if label is None else _volume(label, "label")
    if lab is not None and lab.shape != img.shape:
        raise ValueError(f"label map shape {lab.shape} differs from image shape {img.shape}")
    sp = _spacing(spacing)
    lo, hi = _window(img, modality, window)
    extent = max(n * s for n, s in zip(img.shape, sp))
    d = min(max(min(sp), extent / max_panel), extent / min_panel)
    X, Y, Z = (n // 2 for n in img.shape)
    # (slice selector: view of (rows, cols) = (vertical, horizontal), row pixel mm, col pixel mm)
    views = [(lambda v: v[::-1, ::-1, Z].T, sp[1], sp[0]),   # axial
             (lambda v: v[::-1, Y, ::-1].T, sp[2], sp[0]),   # coronal
             (lambda v: v[X, ::-1, ::-1].T, sp[2], sp[1])]   # sagittal
    panels = []
    for view, row_mm, col_mm in views:
        sl = view(img).astype(np.float32)
        size = (max(1, round(sl.shape[1] * col_mm / d)), max(1, round(sl.shape[0] * row_mm / d)))  # PIL: (w, h)
        gray = np.clip((sl - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
        gray = np.asarray(Image.fromarray(gray).resize(size, Image.BILINEAR), dtype=np.float32)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        if lab is not None:
            ls = np.ascontiguousarray(view(lab)).astype(np.int32)
            ls = np.asarray(Image.fromarray(ls, mode="I").resize(size, Image.NEAREST))
            palette = np.array([label_color(v) for v in range(int(ls.max()) + 1)], np.float32)
            m = (ls != 0) & (ls != BODY_LABEL)
            rgb[m] = (1 - _OVERLAY_ALPHA) * rgb[m] + _OVERLAY_ALPHA * palette[ls[m]]
        panels.append(np.rint(rgb).astype(np.uint8))
    gap = 4
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.zeros((max(p.shape[0] for p in panels), width, 3), np.uint8)
    x = 0
    for p in panels:
        canvas[: p.shape[0], x: x + p.shape[1]] = p
        x += p.shape[1] + gap
    return Image.fromarray(canvas, mode="RGB")


def preview_png(path: str | os.PathLike, image_hu: Any, label: Any = None, spacing: Sequence[float] = (1, 1, 1),
                modality: str | int = "ct", window: str | tuple[float, float] | None = None,
                overwrite: bool = False) -> Path:
    """Write `preview_image(...)` as a PNG, atomically."""
    path = Path(path)
    pic = preview_image(image_hu, label, spacing, modality, window)
    with _staged(str(path), overwrite) as st:
        _write_file(st.path(path), lambda f: pic.save(f, format="PNG"))
    return path
