"""NIfTI writing: int16 images and uint8 label maps with a RAS affine, atomically and byte-reproducibly."""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fastmaisi.cores import usable_cores
from fastmaisi.io.atomic import _staged, _write_file
from fastmaisi.io.volumes import _image_data, _label_data, ras_affine

SYNTHETIC_DESCRIPTION = "SYNTHETIC - fastmaisi"


def _nifti_image(data: np.ndarray, affine: np.ndarray, kind: str) -> Any:
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    hdr["descrip"] = f"{SYNTHETIC_DESCRIPTION} {kind}".encode()
    if kind == "label":
        hdr.set_intent("label")
    return img


def _gzip_class() -> type:
    """python-isal's GzipFile (the `fast` extra: ISA-L deflate, several times faster) when installed, else gzip's.
    Both write standard gzip that nibabel and every other reader opens; each gives the same bytes for a volume."""
    try:
        from isal.igzip import GzipFile
    except ImportError:
        return gzip.GzipFile
    return GzipFile


def deflate_name() -> str:
    """Which deflate writes .nii.gz here (for records): "isal" or "zlib"."""
    return "zlib" if _gzip_class() is gzip.GzipFile else "isal"


def _deflate_threads() -> int:
    """Threads for one file's ISA-L deflate: half the cores this process may use (an image and its label map are
    written at the same time), 1 to 8."""
    return max(1, min(8, usable_cores() // 2))


def _gzip_stream(f: Any) -> Any:
    """A gzip writer over the open file `f`, level 1, with no file name and mtime 0 in its header (the same volume
    gives the same bytes, and hash). With python-isal: its threaded writer (1 MiB blocks deflated on several cores,
    each primed with the previous block's last 32 KiB; one gzip member, the same bytes for any thread count)."""
    cls = _gzip_class()
    if cls is not gzip.GzipFile:
        try:
            from isal import igzip_threaded
        except ImportError:  # (python-isal before its threaded writer)
            pass
        else:
            return _ForwardWriter(igzip_threaded.open(f, "wb", compresslevel=1, threads=_deflate_threads()))
    return cls(filename="", fileobj=f, mode="wb", compresslevel=1, mtime=0)


class _ForwardWriter(io.RawIOBase):
    """A write-only stream that can also seek forward (filling with zeros) and tell, as gzip.GzipFile in write mode
    can: nibabel seeks to the header and data offsets it writes at. Closing it closes the wrapped stream."""

    def __init__(self, stream: Any):
        super().__init__()
        self._stream, self._pos = stream, 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = self._stream.write(data)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: pos, io.SEEK_CUR: self._pos + pos}.get(whence, -1)
        if target < self._pos:
            raise OSError("a gzip stream being written can only seek forward")
        if target > self._pos:
            self.write(bytes(target - self._pos))
        return self._pos

    def flush(self) -> None:
        if not self.closed:
            self._stream.flush()

    def close(self) -> None:
        if not self.closed:
            super().close()  # (flushes first)
            self._stream.close()


def _write_nifti_to(path: Path, img: Any, compress: bool) -> None:
    def write(f: Any) -> None:
        if compress:
            with _gzip_stream(f) as gz:
                img.to_file_map(img.make_file_map({"image": gz}))
        else:
            img.to_file_map(img.make_file_map({"image": f}))

    _write_file(path, write)


def _nifti_suffix(path: Path) -> bool:
    """True for .nii.gz, False for .nii; anything else is an error."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return True
    if name.endswith(".nii"):
        return False
    raise ValueError(f"NIfTI path must end in .nii or .nii.gz, got {str(path)!r}")


def write_nifti(path: str | os.PathLike, array: Any, spacing: Sequence[float], kind: str = "image",
                origin: Sequence[float] | None = None, overwrite: bool = False) -> Path:
    """Write an int16 image (kind="image") or a uint8 label map (kind="label") as NIfTI with a RAS affine, atomically.

    Raises ValueError for a bad array, spacing or an existing file (unless `overwrite`), OSError when writing fails
    (then no file is left under `path`).
    """
    path = Path(path)
    compress = _nifti_suffix(path)
    if kind == "image":
        data = _image_data(array)
    elif kind == "label":
        data = _label_data(array)
    else:
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    img = _nifti_image(data, ras_affine(spacing, origin), kind)
    with _staged(str(path), overwrite) as st:
        _write_nifti_to(st.path(path), img, compress)
    return path
