"""How fast the `fastmaisi app` page opens, and whether the viewer freezes the tab on a large volume.

    python3 bench/app_page_timing.py results.json [--size 512] [--loads 5]

Starts `fastmaisi app` (demo, CPU), then in Debian's headless Chromium (Playwright, software WebGL):
1. page load, `--loads` times, each in a fresh browser profile: navigation start -> DOMContentLoaded, -> load event,
   -> the form usable (config fetched, form built: the page's performance mark `fastmaisi-form-ready`), -> the
   NiiVue viewer attached (mark `fastmaisi-viewer-attached`; the viewer script loads after the form);
2. a SIZE^3 int16 CT-like NIfTI (.nii.gz, as the app writes) plus a uint8 label map, and what the page's viewer
   loads for them: the server's display copies (`fastmaisi.app.views.display_copy`, the code behind
   `GET /api/jobs/{id}/view/{kind}`: at most 256^3 voxels, uncompressed; the files themselves up to 256^3), made here
   and timed (the server makes them once, on the first view). Loaded into the page's NiiVue viewer: NiiVue's reading
   alone (no WebGL) of the view and, as the baseline, of the full-resolution file; then the view shown in the axial
   view and in the page's default three planes (unless --no-webgl): seconds until shown, and the longest main-thread
   task (PerformanceObserver "longtask") and the longest gap between animation frames while it loads: the tab is
   frozen for as long as those last.
The volumes are served with CORS by a small HTTP server of this script. Writes one JSON object to the given path.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

OBSERVE = """() => {
  window.__long = []; window.__gap = 0; let last = performance.now();
  new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__long.push(e.duration); })
    .observe({ type: "longtask", buffered: false });
  const tick = (t) => {
    window.__gap = Math.max(window.__gap, t - last); last = t; window.__raf = requestAnimationFrame(tick);
  };
  window.__raf = requestAnimationFrame(tick);
}"""
PARSE = """async (url) => {
  const t0 = performance.now();
  const img = await niivue.NVImage.loadFromUrl({ url });
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  cancelAnimationFrame(window.__raf);
  return { seconds: (performance.now() - t0) / 1000, longest_task_ms: Math.max(0, ...window.__long),
           long_tasks: window.__long.length, longest_frame_gap_ms: window.__gap,
           dims: Array.from(img.hdr.dims.slice(1, 4)) };
}"""
LOAD = """async ([image, label, sliceType]) => {
  const nv = state.nv;
  for (const v of [...nv.volumes].reverse()) nv.removeVolume(v);
  nv.setSliceType(sliceType);
  const t0 = performance.now();
  await nv.loadVolumes([{ url: image, colormap: "gray", cal_min: -160, cal_max: 240 },
                        { url: label, colormap: "warm", opacity: 0.5 }]);
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const seconds = (performance.now() - t0) / 1000;
  cancelAnimationFrame(window.__raf);
  return { seconds, longest_task_ms: Math.max(0, ...window.__long), long_tasks: window.__long.length,
           longest_frame_gap_ms: window.__gap, dims: Array.from(nv.volumes[0].dims.slice(1, 4)) };
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CORSHandler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def log_message(self, *args):
        pass


def write_volumes(folder: Path, n: int) -> tuple[Path, Path]:
    """A CT-like int16 body (ellipsoid of soft tissue with a denser 'liver' and air outside) and its label map."""
    import nibabel as nib
    import numpy as np

    z, y, x = np.ogrid[-1:1:n * 1j, -1:1:n * 1j, -1:1:n * 1j]
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    liver = ((x - 0.3) / 0.35) ** 2 + (y / 0.3) ** 2 + (z / 0.4) ** 2 < 1
    image = np.full((n, n, n), -1000, np.int16)
    image[np.broadcast_to(body, image.shape)] = 40
    image[liver] = 90
    rng = np.random.default_rng(0)
    image += rng.integers(-20, 20, size=image.shape, dtype=np.int16)
    label = np.zeros((n, n, n), np.uint8)
    label[np.broadcast_to(body, label.shape)] = 200
    label[liver] = 1
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    paths = folder / f"ct_{n}_image.nii.gz", folder / f"ct_{n}_label.nii.gz"
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0).copy(), affine), paths[0])
    nib.save(nib.Nifti1Image(label.transpose(2, 1, 0).copy(), affine), paths[1])
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", help="JSON file to write")
    p.add_argument("--size", type=int, default=512, help="edge of the cubic test volume (voxels)")
    p.add_argument("--loads", type=int, default=5, help="page loads to time")
    p.add_argument("--no-webgl", action="store_true", help="time NiiVue's reading of the volume only (software WebGL "
                   "on a machine without a GPU takes minutes at 256^3)")
    p.add_argument("--no-full", action="store_true", help="skip the baseline: NiiVue reading the full-resolution file")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="fastmaisi-page-timing-"))
    t = time.perf_counter()
    image, label = write_volumes(work, args.size)
    print(f"wrote {args.size}^3 test volumes in {time.perf_counter() - t:.1f} s "
          f"({image.stat().st_size / 2**20:.0f} + {label.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)
    from fastmaisi.app.views import display_copy, view_info

    t = time.perf_counter()
    view_image = display_copy(work, image, "image")
    view_label = display_copy(work, label, "label", image_path=image)
    view_seconds = time.perf_counter() - t
    print(f"display copies in {view_seconds:.1f} s: {view_info(image)}", file=sys.stderr)
    rel = lambda path: path.relative_to(work).as_posix()  # noqa: E731
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_CORSHandler, directory=str(work)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    files_url = f"http://127.0.0.1:{files.server_address[1]}/"
    port = _free_port()
    app = subprocess.Popen([sys.executable, "-m", "fastmaisi", "app", "--port", str(port), "--output-dir",
                            str(work / "out"), "--device", "cpu", "-q"], env=os.environ.copy(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    result = {"what": "fastmaisi app page: load time and a large volume in the viewer", "host": platform.node(),
              "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "size": args.size,
              "browser": CHROMIUM, "webgl": None, "page_loads": [], "view": view_info(image),
              "view_copy_seconds": round(view_seconds, 2), "view_mib": round(view_image.stat().st_size / 2**20, 1)}
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "api/config", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        with sync_playwright() as pw:
            for i in range(args.loads):
                ctx = pw.chromium.launch_persistent_context(str(work / f"profile{i}"), executable_path=CHROMIUM,
                                                            headless=True, args=ARGS,
                                                            viewport={"width": 1400, "height": 900})
                page = ctx.new_page()
                page.goto(url)
                page.wait_for_selector("body[data-viewer-attached='1']", timeout=120_000)
                timing = page.evaluate("""() => { const n = performance.getEntriesByType('navigation')[0];
                    const mark = (name) => performance.getEntriesByName(name)[0].startTime;
                    return { dom_content_loaded_ms: n.domContentLoadedEventEnd, load_ms: n.loadEventEnd,
                             ready_ms: mark('fastmaisi-form-ready'),
                             viewer_attached_ms: mark('fastmaisi-viewer-attached') }; }""")
                result["page_loads"].append(timing)
                if i < args.loads - 1:
                    ctx.close()
            result["webgl"] = page.evaluate("""() => { const g = document.createElement('canvas').getContext('webgl2');
                const e = g.getExtension('WEBGL_debug_renderer_info');
                return e ? g.getParameter(e.UNMASKED_RENDERER_WEBGL) : g.getParameter(g.RENDERER); }""")
            page.evaluate(OBSERVE)
            result["view_parse_only"] = page.evaluate(PARSE, files_url + rel(view_image))
            if not args.no_full:
                page.evaluate(OBSERVE)
                result["full_parse_only"] = page.evaluate(PARSE, files_url + image.name)
            views = () if args.no_webgl else (("axial", 0), ("multiplanar", 3))  # 3: the page's default view
            for name, slice_type in views:
                page.evaluate(OBSERVE)
                result[f"view_{name}"] = page.evaluate(LOAD, [files_url + rel(view_image),
                                                               files_url + rel(view_label), slice_type])
                page.screenshot(path=str(Path(args.output).with_suffix(f".{name}.png")))
            result["image_mib_gz"] = round(image.stat().st_size / 2**20, 1)
            ctx.close()
    finally:
        app.terminate()
        app.wait(timeout=30)
        files.shutdown()
    for key in ("dom_content_loaded_ms", "load_ms", "ready_ms", "viewer_attached_ms"):
        values = [t[key] for t in result["page_loads"]]
        result[f"median_{key}"] = round(statistics.median(values), 1)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "page_loads"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
