"""Bring your own segmentation: TotalSegmentator, NV-Segment, VISTA3D or MAISI label maps -> MAISI ids.

Modules: `read` (inputs in their own grid), `convert` (vocabulary, mapping, merge, body, report), `geometry` (world
geometry through generation), `mask_input` (what `generate --mask` calls), `cli` (`fastmaisi labels`).
"""

from fastmaisi.segmentations.convert import convert_segmentation, detect_vocabulary, report_lines
from fastmaisi.segmentations.read import Segmentation, read_segmentation

__all__ = ["Segmentation", "convert_segmentation", "detect_vocabulary", "read_segmentation", "report_lines"]
