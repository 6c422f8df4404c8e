"""Procedural torso CT phantoms with MAISI labels: test data and a demo training set (numpy/scipy only).

Each phantom is a lower chest + upper abdomen: body (200) with subcutaneous fat, a muscle wall and visceral fat;
five lung lobes; heart, aorta, vena cava, oesophagus, trachea and bronchi; liver, gallbladder, spleen, stomach (with
a gas cap), pancreas, kidneys, colon, small bowel; vertebrae C7..L5 with spinal cord, 24 ribs with costal
cartilages, sternum, paravertebral and psoas muscles; optionally a liver or lung tumour.

Geometry is in millimetres, so the anatomy keeps its physical size whatever the grid: `shape` and `spacing` set the
field of view, centred in x and y and at `center_z_mm` (0 = the right diaphragm dome) in z. Per seed: body size,
organ positions (about +-5 mm), sizes (+-12 %), orientations, one smooth random deformation of the whole body
(std 4 mm, 50 mm correlation), tissue HU, noise level. Anatomy draws do not depend on the grid, so one seed gives the
same patient on every grid. Images: HU per tissue (portal-venous contrast phase: liver ~105, spleen ~120, kidney ~165,
muscle ~55) plus a smooth texture field, a gaussian blur (partial volume / scanner PSF), then white noise (10-20 HU) inside the body; air outside the body stays exactly -1000.

Arrays are (X, Y, Z) in RAS index order: axis 0 runs from the patient's left to right, axis 1 posterior to anterior,
axis 2 inferior to superior; the NIfTI affine is diag(spacing) (RAS+).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from fastmaisi.labels import BODY, LABELS
from fastmaisi.argtypes import OneLineParser

TUMOURS = (None, "liver", "lung")
_A0, _B0 = 130.0, 95.0  # template body half-width (x) and anterior half-depth (y), mm
_WARP_NODES = (np.arange(-300.0, 301.0, 50.0), np.arange(-300.0, 301.0, 50.0), np.arange(-450.0, 451.0, 50.0))
_WARP_STD_MM, _WARP_MAX_MM = 4.0, 10.0
_VERTEBRAE = ["C7"] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]  # top to bottom


def _id(name: str) -> int:
    return LABELS[name]


def _rot(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _basis(coords: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    d = (coords[:, None] - nodes[None, :]) / 50.0
    return np.exp(-0.5 * d * d).astype(np.float32)


def _smooth_field(coef: np.ndarray, bases) -> np.ndarray:
    """Tensor-product gaussian-RBF field: sum_abc coef[a,b,c] bx[i,a] by[j,b] bz[k,c] -> (X, Y, Z) float32."""
    bx, by, bz = bases
    t = np.tensordot(bx, coef.astype(np.float32), axes=(1, 0))  # (X, ny, nz)
    t = np.matmul(by, t)  # (X, Y, nz)
    return (t.reshape(-1, t.shape[-1]) @ bz.T).reshape(t.shape[0], t.shape[1], -1)  # one GEMM -> (X, Y, Z)


class _Canvas:
    """The grid, the warped template coordinates and the label / HU volumes being painted."""

    def __init__(self, shape, spacing, center_z, scale, warp_coef, texture_coef):
        self.shape, self.spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing)]
        self.axes[2] = self.axes[2] + center_z
        self.scale = scale
        bases = [_basis(a, nodes) for a, nodes in zip(self.axes, _WARP_NODES)]
        norm = 1.0 / math.sqrt(math.pi) ** 1.5  # sum of squared basis weights per axis is ~sqrt(pi)
        coords = []
        for a in range(3):
            d = np.clip(_smooth_field(warp_coef[a] * norm, bases), -_WARP_MAX_MM, _WARP_MAX_MM)
            view = [None, None, None]
            view[a] = slice(None)
            d += self.axes[a][tuple(view)].astype(np.float32)
            d /= np.float32(scale[a])
            coords.append(d)
        self.X, self.Y, self.Z = coords  # template coordinates (mm in the reference body) of every voxel
        self.texture = _smooth_field(texture_coef * norm, bases)
        self.label = np.zeros(self.shape, np.uint8)
        self.hu = np.full(self.shape, -1000.0, np.float32)

    def box(self, lo, hi):
        """Index slices covering template box [lo, hi] (plus the deformation margin)."""
        sl = []
        for a in range(3):
            p0 = min(lo[a], hi[a]) * self.scale[a] - _WARP_MAX_MM - self.spacing[a]
            p1 = max(lo[a], hi[a]) * self.scale[a] + _WARP_MAX_MM + self.spacing[a]
            sl.append(slice(int(np.searchsorted(self.axes[a], p0)), int(np.searchsorted(self.axes[a], p1, "right"))))
        return tuple(sl)

    def coords(self, sl):
        return self.X[sl], self.Y[sl], self.Z[sl]

    def paint(self, sl, mask, label_id: int, hu, only=None):
        """Set label and HU where mask (within box sl); `only`: restrict to voxels currently carrying these ids."""
        lab, img = self.label[sl], self.hu[sl]
        if only is not None:
            mask = mask & np.isin(lab, only)
        lab[mask] = label_id
        img[mask] = hu if np.isscalar(hu) else hu[mask]

    # ------------------------------------------------------------------ shapes (template coordinates)
    def ellipsoid(self, center, axes, rot=None):
        ext = float(max(axes))
        c = np.asarray(center, float)
        sl = self.box(c - ext, c + ext)
        X, Y, Z = self.coords(sl)
        dx, dy, dz = X - np.float32(c[0]), Y - np.float32(c[1]), Z - np.float32(c[2])
        if rot is not None:  # local coordinates u = R^T d
            dx, dy, dz = (rot[0, i] * dx + rot[1, i] * dy + rot[2, i] * dz for i in range(3))
        q = (dx / axes[0]) ** 2 + (dy / axes[1]) ** 2 + (dz / axes[2]) ** 2
        return sl, q <= 1.0, q

    def tube(self, points, radii):
        """Union of capsules along a polyline with linearly varying radius; returns (sl, mask, normalised radius)."""
        pts = np.asarray(points, float)
        rad = np.broadcast_to(np.asarray(radii, float), (len(pts),))
        sl = self.box(pts.min(0) - rad.max(), pts.max(0) + rad.max())
        X, Y, Z = self.coords(sl)
        best = np.full(X.shape, np.inf, np.float32)
        for p, q, rp, rq in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
            seg = q - p
            t = ((X - p[0]) * seg[0] + (Y - p[1]) * seg[1] + (Z - p[2]) * seg[2]) / max(float(seg @ seg), 1e-9)
            t = np.clip(t, 0.0, 1.0)
            dist = np.sqrt((X - p[0] - t * seg[0]) ** 2 + (Y - p[1] - t * seg[1]) ** 2 + (Z - p[2] - t * seg[2]) ** 2)
            np.minimum(best, dist / (rp + t * (rq - rp)), out=best)
        return sl, best <= 1.0, best


def _draw(rng: np.random.Generator) -> dict:
    """All random anatomy parameters of one phantom, in a fixed order (independent of the grid)."""
    u, n = rng.uniform, rng.normal
    p = {
        "half_width": u(116.0, 132.0), "half_depth": u(84.0, 100.0), "height": u(0.92, 1.08),
        "warp": n(0.0, _WARP_STD_MM, (3, len(_WARP_NODES[0]), len(_WARP_NODES[1]), len(_WARP_NODES[2]))),
        "texture": n(0.0, 5.0, (len(_WARP_NODES[0]), len(_WARP_NODES[1]), len(_WARP_NODES[2]))),
        "fat": u(10.0, 20.0), "muscle": u(7.0, 11.0), "posterior": u(0.86, 0.94),
        "dome_r": n(0.0, 6.0), "dome_l_drop": u(8.0, 20.0), "t10": n(4.0, 6.0),
        "pitch_t": u(22.5, 25.5), "pitch_l": u(32.0, 36.0), "rib_drop": u(70.0, 95.0),
        "fissure": n(0.0, 8.0), "horizontal": n(95.0, 8.0), "noise": u(10.0, 20.0),
    }
    organs = ["liver_r", "liver_l", "spleen", "stomach", "kidney_r", "kidney_l", "gallbladder", "heart", "pancreas"]
    for o in organs:  # centre shift (mm), per-axis size factor, small rotations (rad)
        p[o] = (n(0.0, 5.0, 3), u(0.88, 1.12, 3), n(0.0, math.radians(7.0), 3))
    # portal-venous-phase contrast CT (most abdominal CT, and most of MAISI's training data): the enhanced liver
    # stands ~50 HU above muscle, so the organs can be told apart by HU, as in the scans users generate
    hu_mean = {"fat": -100, "muscle": 55, "visceral": -90, "lung": -850, "liver": 105, "spleen": 120, "kidney": 165,
               "pancreas": 85, "stomach": 25, "gallbladder": 8, "colon": 15, "bowel": 35, "heart": 150, "vessel": 160,
               "wall": 45, "cord": 35, "cancellous": 300, "cortical": 700, "arch": 500, "rib": 550, "sternum": 400,
               "cartilage": 130, "disc": 80}
    spread = {"lung": 20, "cancellous": 30, "rib": 50, "cortical": 50}
    p["hu"] = {k: float(v + n(0.0, spread.get(k, 6.0))) for k, v in hu_mean.items()}
    return p


def _organ(p, name, center, axes, rot_deg=(0.0, 0.0, 0.0)):
    shift, size, ang = p[name]
    rot = _rot(*(math.radians(a) + d for a, d in zip(rot_deg, ang)))
    return np.asarray(center) + shift, np.asarray(axes) * size, rot


def make_phantom(shape=(96, 96, 64), spacing=(3.0, 3.0, 4.0), seed: int = 0, tumour: str | None = None,
                 center_z_mm: float = -30.0) -> tuple[np.ndarray, np.ndarray]:
    """One torso CT phantom: (image_hu float32 (X, Y, Z), label uint8 (X, Y, Z)), RAS index order.

    Args:
        shape, spacing: grid size (voxels) and voxel size (mm); together the field of view (default 288x288x256 mm).
        seed: the patient (anatomy, HU, noise); the same seed gives the same output.
        tumour: None, "liver" (hepatic tumour, label 26) or "lung" (lung tumour, label 23).
        center_z_mm: anatomical z at the centre of the field of view (0 = right diaphragm dome; lungs reach +265,
            vertebra L5 about -250).
    """
    if tumour not in TUMOURS:
        raise ValueError(f"tumour={tumour!r}: choose None, 'liver' or 'lung'")
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"shape {shape} / spacing {spacing}: expected 3 positive sizes and 3 positive spacings (mm)")
    p = _draw(np.random.default_rng([int(seed), 0]))
    scale = (p["half_width"] / _A0, p["half_depth"] / _B0, p["height"])
    cv = _Canvas(shape, spacing, center_z_mm, scale, p["warp"], p["texture"])
    _body_and_spine_frame(cv, p)
    _thorax(cv, p)
    _abdomen(cv, p)
    _mediastinum(cv, p)
    _skeleton(cv, p)
    if tumour is not None:
        _tumour(cv, p, tumour, np.random.default_rng([int(seed), 1]))

    from scipy import ndimage

    inside = cv.label > 0
    cv.hu[inside] += cv.texture[inside]
    sigma = [max(0.5, 0.8 / s) for s in spacing]  # scanner PSF on top of the voxel's own averaging
    image = ndimage.gaussian_filter(cv.hu, sigma, mode="nearest")
    tissue = image > -999.0  # air stays exactly -1000; the blurred skin edge gets noise like the body
    noise = np.random.default_rng([int(seed), 2]).standard_normal(int(tissue.sum()), dtype=np.float32)
    image[tissue] += noise * np.float32(p["noise"])
    image[~tissue] = -1000.0  # exact (the blur leaves float rounding there)
    np.clip(image, -1024.0, 3071.0, out=image)
    return image, cv.label


# -------------------------------------------------------------------------------------------------- anatomy builders
def _frame(p):
    """Derived template geometry shared by the builders."""
    fat, mus = p["fat"], p["muscle"]
    b_post = _B0 * p["posterior"]
    y_vb = -b_post + fat + 42.0  # vertebral body centre
    cav = (_A0 - fat - mus, _B0 - fat - mus, b_post - fat - mus)  # cavity half-width, anterior / posterior depth
    levels, t10 = {}, _VERTEBRAE.index("T10")
    centres = np.zeros(len(_VERTEBRAE))  # level centres, T10 at p["t10"]
    centres[t10] = p["t10"]
    for i in range(t10 - 1, -1, -1):
        centres[i] = centres[i + 1] + p["pitch_t"]
    for i in range(t10 + 1, len(_VERTEBRAE)):
        pitch = p["pitch_t"] * 1.12 if _VERTEBRAE[i].startswith("T") else p["pitch_l"]
        centres[i] = centres[i - 1] - pitch
    for name, c in zip(_VERTEBRAE, centres):
        lumbar = name.startswith("L")
        pitch = p["pitch_l"] if lumbar else p["pitch_t"]
        levels[name] = (c, pitch - (8.0 if lumbar else 5.0))  # centre, bone height
    return {"b_post": b_post, "y_vb": y_vb, "y_canal": y_vb - 22.0, "cav": cav, "levels": levels}


def _ellipse_q(X, Y, a, b_ant, b_post):
    """Normalised squared elliptic radius with a flatter posterior (b_post for y < 0)."""
    b = np.where(Y >= 0, np.float32(b_ant), np.float32(b_post))
    return (X / np.float32(a)) ** 2 + (Y / b) ** 2


def _diaphragm(p, X, Y):
    """Height (template mm) of the diaphragm surface: two domes, deeper laterally and posteriorly."""
    zr, zl = p["dome_r"], p["dome_r"] - p["dome_l_drop"]
    dr = zr - 45.0 * (((X - 50.0) / 90.0) ** 2 + ((Y - 5.0) / 85.0) ** 2)
    dl = zl - 45.0 * (((X + 50.0) / 90.0) ** 2 + ((Y - 5.0) / 85.0) ** 2)
    post = 25.0 * np.clip(-(Y + 20.0) / 60.0, 0.0, 1.0)
    return np.maximum(np.maximum(dr, dl) - post, -110.0)


def _body_and_spine_frame(cv: _Canvas, p):
    f = _frame(p)
    p["frame"] = f
    hu = p["hu"]
    sl = cv.box((-_A0, -f["b_post"], -300.0), (_A0, _B0, 330.0))
    X, Y, Z = cv.coords(sl)
    zin = (Z > -300.0) & (Z < 330.0)
    q_skin = _ellipse_q(X, Y, _A0, _B0, f["b_post"])
    fat = p["fat"]
    q_fat = _ellipse_q(X, Y, _A0 - fat, _B0 - fat, f["b_post"] - fat)
    cav = f["cav"]
    q_cav = _ellipse_q(X, Y, *cav)
    cv.paint(sl, (q_skin <= 1.0) & zin, BODY, hu["fat"])
    cv.paint(sl, (q_fat <= 1.0) & zin, BODY, hu["muscle"])
    cv.paint(sl, (q_cav <= 1.0) & zin, BODY, hu["visceral"])
    # paravertebral muscles (autochthon) and, below the kidneys' upper poles, the iliopsoas
    for side, name in ((-1, "left autochthon"), (1, "right autochthon")):
        m = (((X - side * 30.0) / 17.0) ** 2 + ((Y - f["y_canal"] + 4.0) / 15.0) ** 2 <= 1.0) & (q_fat <= 1.0) & zin
        cv.paint(sl, m, _id(name), hu["muscle"] + 5.0)
    for side, name in ((-1, "left iliopsoas"), (1, "right iliopsoas")):
        r = np.clip(6.0 + 0.12 * (-100.0 - Z), 0.0, 24.0)
        m = ((X - side * (26.0 + 0.5 * r)) ** 2 + (Y - f["y_vb"] - 4.0) ** 2 <= r**2) & (Z < -100.0) & zin
        cv.paint(sl, m, _id(name), hu["muscle"] + 5.0)
    # the column of vertebral bodies and discs (discs: body label, soft-tissue HU; bone painted by _skeleton)
    m = ((X / 22.0) ** 2 + ((Y - f["y_vb"]) / 16.0) ** 2 <= 1.0) & zin
    cv.paint(sl, m, BODY, hu["disc"])


def _thorax(cv: _Canvas, p):
    f, hu = p["frame"], p["hu"]
    a, b_ant, b_post = (c - 9.0 for c in f["cav"])
    sl = cv.box((-a, -b_post, -130.0), (a, b_ant, 270.0))
    X, Y, Z = cv.coords(sl)
    apex = np.sqrt(np.clip(1.0 - ((Z - 150.0) / 115.0) ** 2, 0.0, 1.0))
    taper = np.where(Z > 150.0, apex, np.float32(1.0))
    q = _ellipse_q(X, Y, a, b_ant, b_post) <= taper**2
    lung = q & (Z > _diaphragm(p, X, Y) + 4.0) & (Z < 265.0) & (np.abs(X + 5.0) > 18.0) & (taper > 0)
    right = X > -5.0
    lower = Z < 70.0 + p["fissure"] - 1.1 * Y  # oblique fissure: high posteriorly, low anteriorly
    middle = ~lower & (Z < p["horizontal"])  # horizontal fissure (right lung only)
    lung_hu = hu["lung"]
    cv.paint(sl, lung & right & lower, _id("right lung lower lobe"), lung_hu)
    cv.paint(sl, lung & right & middle, _id("right lung middle lobe"), lung_hu)
    cv.paint(sl, lung & right & ~lower & ~middle, _id("right lung upper lobe"), lung_hu)
    cv.paint(sl, lung & ~right & lower, _id("left lung lower lobe"), lung_hu)
    cv.paint(sl, lung & ~right & ~lower, _id("left lung upper lobe"), lung_hu)


def _in_abdomen(cv, p, sl, margin=3.0):
    X, Y, Z = cv.coords(sl)
    return (_ellipse_q(X, Y, *p["frame"]["cav"]) <= 1.0) & (Z < _diaphragm(p, X, Y) - margin)


def _abdomen(cv: _Canvas, p):
    f, hu = p["frame"], p["hu"]
    y_vb, soft = f["y_vb"], (BODY,)
    # colon, then solid organs, then the small bowel filling what is left in the lower anterior abdomen
    for pts, r in (([(82, -5, -270), (82, 5, -150)], 22.0),
                   ([(78, 20, -140), (30, 52, -155), (-30, 52, -150), (-78, 20, -125)], 20.0),
                   ([(-82, -5, -125), (-82, -5, -270)], 17.0)):
        sl, m, _ = cv.tube(pts, r)
        cv.paint(sl, m & _in_abdomen(cv, p, sl), _id("colon"), hu["colon"], only=soft)
    c, ax, rot = _organ(p, "stomach", (-45, 25, -55), (38, 36, 50), (0, 20, 0))
    sl, m, _ = cv.ellipsoid(c, ax, rot)
    m &= _in_abdomen(cv, p, sl)
    X, Y, Z = cv.coords(sl)
    gas = (Y > c[1] + 0.45 * ax[1]) & (Z > c[2])
    cv.paint(sl, m, _id("stomach"), np.where(gas, np.float32(-900.0), np.float32(hu["stomach"])))
    liver = []
    for key, cen, axes, rd in (("liver_r", (58, 2, -55), (70, 80, 75), (0, 0, 0)),
                               ("liver_l", (-12, 38, -40), (50, 30, 32), (0, 0, -15))):
        c, ax, rot = _organ(p, key, cen, axes, rd)
        sl, m, _ = cv.ellipsoid(c, ax, rot)
        cv.paint(sl, m & _in_abdomen(cv, p, sl), _id("liver"), hu["liver"])
        liver.append((c, ax))
    p["liver_geom"] = liver
    c, ax, rot = _organ(p, "gallbladder", (40, 48, -100), (14, 14, 30), (30, 0, 0))
    sl, m, _ = cv.ellipsoid(c, ax, rot)
    cv.paint(sl, m & _in_abdomen(cv, p, sl), _id("gallbladder"), hu["gallbladder"])
    c, ax, rot = _organ(p, "spleen", (-75, -15, -75), (24, 45, 45), (0, 0, 40))
    sl, m, _ = cv.ellipsoid(c, ax, rot)
    cv.paint(sl, m & _in_abdomen(cv, p, sl), _id("spleen"), hu["spleen"])
    for key, name, cen, rd in (("kidney_r", "right kidney", (62, y_vb - 2, -128), (0, -12, 25)),
                               ("kidney_l", "left kidney", (-62, y_vb - 2, -112), (0, 12, -25))):
        c, ax, rot = _organ(p, key, cen, (25, 22, 52), rd)
        sl, m, _ = cv.ellipsoid(c, ax, rot)
        cv.paint(sl, m & _in_abdomen(cv, p, sl), _id(name), hu["kidney"])
    shift, size, _ = p["pancreas"]
    pts = np.array([(28, 8, -112), (5, 20, -100), (-30, 5, -92), (-68, -20, -80)], float) + shift
    sl, m, _ = cv.tube(pts, np.array([18, 13, 13, 11]) * size.mean())
    cv.paint(sl, m & _in_abdomen(cv, p, sl), _id("pancreas"), hu["pancreas"],
             only=(BODY, _id("liver"), _id("stomach"), _id("colon")))  # behind the stomach, under the liver
    sl = cv.box((-110, y_vb + 18, -275), (110, 100, -135))
    X, Y, Z = cv.coords(sl)
    m = _in_abdomen(cv, p, sl) & (Y > y_vb + 18) & (Z > -275) & (Z < -135)
    cv.paint(sl, m, _id("small bowel"), hu["bowel"], only=soft)


def _mediastinum(cv: _Canvas, p):
    f, hu = p["frame"], p["hu"]
    y_vb = f["y_vb"]
    c, ax, rot = _organ(p, "heart", (-15, 22, 40), (55, 45, 60), (0, 15, -35))
    sl, m, _ = cv.ellipsoid(c, ax, rot)
    X, Y, Z = cv.coords(sl)
    cv.paint(sl, m & (Z > _diaphragm(p, X, Y) + 2.0), _id("heart"), hu["heart"])
    vessels = (
        ("aorta", [(3, 28, 80), (5, 32, 140), (-5, 8, 178), (-20, y_vb + 26, 160), (-20, y_vb + 26, 40),
                   (-15, y_vb + 26, -100), (-10, y_vb + 26, -200)], [13, 13, 12, 12, 12, 11, 10]),
        ("inferior vena cava", [(22, y_vb + 30, -210), (25, y_vb + 35, -60), (20, 5, 0), (15, 15, 20)], 11),
        ("esophagus", [(-38, 18, -40), (-12, y_vb + 20, 0), (-6, y_vb + 22, 120), (-3, y_vb + 25, 330)], 8),
    )
    for name, pts, r in vessels:
        sl, m, _ = cv.tube(pts, r)
        cv.paint(sl, m, _id(name), hu["vessel"] if name != "esophagus" else hu["wall"])
    carina = (0, y_vb + 48, 165)
    for name, pts, r in (("trachea", [carina, (0, y_vb + 45, 330)], 9.0),
                         ("airway", [carina, (35, y_vb + 40, 140)], 6.0),
                         ("airway", [carina, (-40, y_vb + 38, 135)], 6.0)):
        sl, m, q = cv.tube(pts, r)
        cv.paint(sl, m, _id(name), np.where(q < 0.7, np.float32(-950.0), np.float32(hu["wall"])))


def _skeleton(cv: _Canvas, p):
    f, hu = p["frame"], p["hu"]
    y_vb, y_c = f["y_vb"], f["y_canal"]
    top = max(c + h / 2 for c, h in f["levels"].values())
    bottom = min(c - h / 2 for c, h in f["levels"].values())
    sl = cv.box((-40, y_c - 40, bottom), (40, y_vb + 20, top))
    X, Y, Z = cv.coords(sl)
    cord = (X**2 + (Y - y_c) ** 2 <= 25.0) & (Z > -290) & (Z < 330)
    cv.paint(sl, cord, _id("spinal cord"), hu["cord"])
    for name, (zc, h) in f["levels"].items():
        lumbar = name.startswith("L")
        rx, ry = (24.0, 17.0) if lumbar else (19.0, 14.0)
        zrel = np.abs(Z - zc)
        slab = zrel <= h / 2
        qb = (X / rx) ** 2 + ((Y - (y_vb + (3.0 if lumbar else 0.0))) / ry) ** 2
        vbody = slab & (qb <= 1.0)
        cortex = (qb > (1 - 2.5 / ry) ** 2) | (zrel > h / 2 - 2.0)
        rc = X**2 + (Y - y_c) ** 2
        arch = slab & (rc > 7.5**2) & (rc <= 14.0**2) & (Y < y_vb - ry + 2)
        spinous = slab & (np.abs(X) < 4.0) & (Y < y_c - 10.0) & (Y > -f["b_post"] + p["fat"] + 3.0) & (zrel < h / 2 - 3)
        reach = 36.0 if lumbar else 30.0
        transverse = slab & (np.abs(Y - y_c - 2.0) < 5.0) & (np.abs(X) < reach) & (zrel < h / 2 - 3)
        bone = vbody | arch | spinous | transverse
        img = np.where(vbody, np.where(cortex, np.float32(hu["cortical"]), np.float32(hu["cancellous"])),
                       np.float32(hu["arch"]))
        cv.paint(sl, bone, _id(f"vertebrae {name}"), img)
    _ribs(cv, p)
    # sternum: from the xiphoid (about T10) to the manubrium (about T2)
    a, b_ant, _ = f["cav"]
    z0, z1 = f["levels"]["T10"][0] - 25.0, f["levels"]["T2"][0] - 10.0
    sl = cv.box((-13, b_ant - 12, z0), (13, b_ant + 2, z1))
    X, Y, Z = cv.coords(sl)
    m = (np.abs(X) < 13.0) & (Y > b_ant - 12.0) & (Y < b_ant + 2.0) & (Z > z0) & (Z < z1)
    cv.paint(sl, m, _id("sternum"), hu["sternum"])


def _ribs(cv: _Canvas, p):
    """Ribs 1..12 per side: tubes on the cavity wall, from the transverse process round to the front, sloping down."""
    f, hu = p["frame"], p["hu"]
    a, b_ant, b_post = f["cav"]
    z_lo = f["levels"]["T12"][0] - p["rib_drop"] - 20.0
    z_hi = f["levels"]["T1"][0] + 20.0
    sl = cv.box((-a - 5, -b_post - 5, z_lo), (a + 5, b_ant + 5, z_hi))
    X, Y, Z = cv.coords(sl)
    b = np.where(Y >= 0, np.float32(b_ant), np.float32(b_post))
    rho = np.sqrt((X / a) ** 2 + (Y / b) ** 2)
    r = np.sqrt(X**2 + Y**2)
    dist = r * (1.0 - 1.0 / np.maximum(rho, 1e-3))  # radial distance to the cavity wall (negative inside)
    shell = np.nonzero(np.abs(dist + 2.0) < 4.5)
    xs, ys, zs = X[shell], Y[shell], Z[shell]
    theta = np.degrees(np.arctan2(ys, np.abs(xs)))  # -90 posterior, 0 lateral, +90 anterior
    start = -62.0
    frac = np.clip((theta - start) / (90.0 - start), 0.0, 1.0)
    zdrop = zs + p["rib_drop"] * frac**1.4 - 10.0  # = the attachment height when on a rib's centre line
    ends = {1: 55, 2: 55, 3: 55, 4: 55, 5: 55, 6: 55, 7: 55, 8: 45, 9: 35, 10: 25, 11: 0, 12: -25}
    lab, img = cv.label[sl], cv.hu[sl]
    for k in range(1, 13):
        zt = f["levels"][f"T{k}"][0]
        on = (np.abs(zdrop - zt) < 6.0) & (theta > start)
        rib = on & (theta <= ends[k])
        cart = on & (theta > ends[k]) & (theta < 82.0) & (k <= 7)
        for side, sel in (("left", xs < 0), ("right", xs >= 0)):
            idx = tuple(s[rib & sel] for s in shell)
            lab[idx], img[idx] = _id(f"{side} rib {k}"), hu["rib"]
            idx = tuple(s[cart & sel] for s in shell)
            lab[idx], img[idx] = _id("costal cartilages"), hu["cartilage"]


def _tumour(cv: _Canvas, p, kind: str, rng: np.random.Generator):
    """A spherical lesion inside its host organ: random host voxels are tried as centres until the whole sphere
    lies in the host and the field of view (the radius shrinks by 10 % every 20 tries; skipped if nothing fits)."""
    if kind == "liver":
        host, label, radius, value = (_id("liver"),), _id("hepatic tumor"), rng.uniform(10, 22), p["hu"]["liver"] - 45
    else:
        host = tuple(_id(n) for n in ("left lung upper lobe", "left lung lower lobe", "right lung upper lobe",
                                      "right lung middle lobe", "right lung lower lobe"))
        label, radius, value = _id("lung tumor"), rng.uniform(6, 15), 30.0 + rng.normal(0, 8)
    voxels = np.flatnonzero(np.isin(cv.label, host))
    if len(voxels) == 0:
        return
    sp, shape = np.asarray(cv.spacing), np.asarray(cv.shape)
    for attempt in range(200):
        if attempt and attempt % 20 == 0:
            radius *= 0.9
        centre = np.array(np.unravel_index(voxels[rng.integers(len(voxels))], cv.shape))
        ext = np.ceil(radius / sp).astype(int)
        lo, hi = centre - ext, centre + ext + 1
        if np.any(lo < 0) or np.any(hi > shape):
            continue
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        grids = np.ogrid[tuple(slice(-e, e + 1) for e in ext)]
        ball = sum((g * s) ** 2 for g, s in zip(grids, sp)) <= radius**2
        if np.isin(cv.label[sl][ball], host).all():
            cv.paint(sl, ball, label, value)
            return


# ------------------------------------------------------------------------------------------------------- dataset
def write_dataset(out_dir, n: int, shape=(96, 96, 64), spacing=(3.0, 3.0, 4.0), seed: int = 0,
                  tumour: str | None = None, workers: int = 1, progress: bool = False, overwrite: bool = False) -> Path:
    """Write n phantoms as NIfTI pairs plus a MAISI-style `datalist.json`; returns the datalist's path.

    Files: `phantom_XXXX_image.nii.gz` (int16 HU) and `phantom_XXXX_label.nii.gz` (uint8), affine diag(spacing)
    (RAS). Phantom i uses seed `seed + i`. `tumour`: None, "liver", "lung" or "mixed" (none / liver / lung in turn).
    Datalist entries: image, label, dim, spacing, modality "ct", fold (i % 5), top/bottom_region_index.
    Existing phantoms or datalist in `out_dir` are a ValueError unless `overwrite`.
    """
    if tumour not in (*TUMOURS, "mixed"):
        raise ValueError(f"tumour={tumour!r}: choose None, 'liver', 'lung' or 'mixed'")
    if n < 1:
        raise ValueError(f"n={n}: need at least one phantom")
    out = Path(out_dir)
    names = ["datalist.json"] + [f"phantom_{i:04d}_{kind}.nii.gz" for i in range(n) for kind in ("image", "label")]
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise ValueError(f"{out} already holds {', '.join(existing[:3])}{more}; pass --overwrite to replace them, or "
                         "choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, tuple(shape), tuple(spacing), seed + i,
             TUMOURS[i % 3] if tumour == "mixed" else tumour) for i in range(n)]
    entries = []
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers)
        results = pool.map(_write_one, jobs)
    else:
        pool, results = None, map(_write_one, jobs)
    try:
        for entry in results:
            entries.append(entry)
            if progress:
                print(f"  [{len(entries)}/{n}] {entry['image']}", file=sys.stderr)
    finally:
        if pool is not None:
            pool.shutdown()
    path = out / "datalist.json"
    tmp = out / f".datalist.json.partial-{os.getpid()}"
    tmp.write_text('{"training": [\n' + ",\n".join("  " + json.dumps(e) for e in entries) + "\n]}\n")
    os.replace(tmp, path)
    return path


def synthetic_demographics(seed: int) -> dict:
    """A weight (kg) that follows phantom `seed`'s drawn body size (72 kg at the mean torso cross-section and
    height, in proportion to their product): what the demo's v2 mask generator learns as its one demographic. The
    phantoms have no age or sex."""
    p = _draw(np.random.default_rng([int(seed), 0]))
    ratio = (p["half_width"] / 124.0) * (p["half_depth"] / 92.0) * p["height"]
    return {"weight": round(72.0 * ratio, 1)}


def _write_one(job) -> dict:
    import nibabel as nib

    from fastmaisi.labels import body_region_from_mask

    out, i, shape, spacing, seed, tumour = job
    image, label = make_phantom(shape, spacing, seed=seed, tumour=tumour)
    affine = np.diag([*spacing, 1.0])
    stem = f"phantom_{i:04d}"
    for suffix, data in (("image", np.round(image).astype(np.int16)), ("label", label)):
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm")
        final = out / f"{stem}_{suffix}.nii.gz"
        tmp = out / f".partial-{os.getpid()}-{final.name}"  # complete or absent under its final name
        try:
            nib.save(img, str(tmp))
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    entry = {"image": f"{stem}_image.nii.gz", "label": f"{stem}_label.nii.gz", "dim": list(shape),
             "spacing": list(spacing), "modality": "ct", "fold": i % 5, "seed": seed, "tumour": tumour}
    try:  # the ddpm-ct UNet's region inputs; a field of view without landmarks has none
        entry["top_region_index"], entry["bottom_region_index"] = body_region_from_mask(label)
    except ValueError:
        pass
    return entry


def phantom_main(argv: list[str] | None = None) -> int:
    """`fastmaisi phantom -o DIR -n N [--size X Y Z] [--spacing SX SY SZ] [--seed S] [--tumour ...] [--workers W]`."""
    ap = OneLineParser(prog="fastmaisi phantom",
                                 description="Write procedural torso CT phantoms with MAISI labels (NIfTI) and a "
                                             "MAISI-style datalist.json.")
    ap.add_argument("-o", "--output", required=True, help="output folder")
    ap.add_argument("-n", "--num", type=int, default=10, help="number of phantoms (default 10)")
    ap.add_argument("--size", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, nargs=3, default=(3.0, 3.0, 4.0), metavar=("SX", "SY", "SZ"),
                    help="voxel size in mm (default 3 3 4: a 288x288x256 mm field of view at the default size)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first phantom (phantom i uses seed+i)")
    ap.add_argument("--tumour", choices=["none", "liver", "lung", "mixed"], default="none")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes")
    ap.add_argument("--overwrite", action="store_true", help="replace phantoms and datalist.json already in the folder")
    args = ap.parse_args(argv)
    if args.num < 1 or min(args.size) < 1 or min(args.spacing) <= 0 or args.workers < 1:
        ap.error("--num, --size, --spacing and --workers must be positive")
    if not all(math.isfinite(s) for s in args.spacing) or args.seed < 0:
        ap.error("--spacing must be finite and --seed >= 0")
    from fastmaisi.cli_guard import CreatedFolders, interrupted, is_fault, report

    created = CreatedFolders(args.output)
    t = time.perf_counter()
    try:
        path = write_dataset(args.output, args.num, args.size, args.spacing, args.seed,
                             None if args.tumour == "none" else args.tumour, workers=args.workers, progress=True,
                             overwrite=args.overwrite)
    except KeyboardInterrupt:
        return interrupted("fastmaisi phantom", created, "complete phantoms were kept (no datalist.json yet)")
    except Exception as exc:
        if not is_fault(exc):
            raise
        return report("fastmaisi phantom", exc, created)
    print(f"wrote {args.num} phantoms and {path} in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(phantom_main())
