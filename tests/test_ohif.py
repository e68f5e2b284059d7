"""The results as a radiologist sees them: OHIF v3 (npm `@ohif/app`, its prebuilt dist/)
reading Orthanc's DICOMweb in headless Chromium.

Orthanc runs the shipped deploy/orthanc configuration (routing script, dicomweb.json);
a synthetic DBT with a malignant mass is uploaded; Orthanc routes it to `dicomnode run`,
which sends back SR, SEG, the malignant Parametric Map (integer, deflated) and the CAD SR.
deploy/ohif/serve.py serves OHIF and proxies DICOMweb. Chromium (driven over the DevTools
protocol) opens the study three times and each time shows one result series in the
viewport, as a double click in OHIF's study browser does; the test checks what is on the screen:

(a) the Parametric Map is drawn over the DBT slice where its values are high, and nothing is
    drawn outside it (screenshots with the overlay and with the overlay's actor hidden,
    compared pixel by pixel against the map's values mapped through the viewport's own
    canvas-to-world transform);
(b) the binary SEG is drawn on its flagged pixels and nowhere else;
(c) the TID 1500 SR is shown in OHIF's SR viewport: every measurement group placed on its
    image, the first region's outline drawn where the SR's coordinates put it.

And in all three: no console error mentions our objects, and no request leaves 127.0.0.1.
Screenshots go to the test's tmp dir, and to $DICOMNODE_SCREENSHOTS_DIR when set
(docs/screenshots in the repository).

The node runs the shipped model (the built-in weights, dicomnode/weights/dbt.pt) with the
default configuration; the checks compare the screen with the objects the node returned,
and the malignant map must be hotter on the mass than elsewhere on its slice.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    DeflatedExplicitVRLittleEndian,
    MammographyCADSRStorage,
    ParametricMapStorage,
    SegmentationStorage,
)

from dicomnode.results.pmap import real_world_values
from tests.support.ohif import (
    CDPError,
    Page,
    chromium,
    chromium_binary,
    ohif_dist,
    ohif_server,
    save_png,
    websocket_client_available,
)
from tests.support.peers import (
    DEPLOY,
    REQUIRE_PEERS,
    deploy_config,
    free_port,
    node_process,
    orthanc,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.ohif]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SR = Comprehensive3DSRStorage
CAD_SR = MammographyCADSRStorage
SEG = SegmentationStorage
PM = ParametricMapStorage
DEFLATED = DeflatedExplicitVRLittleEndian
SEED = 1  # seed 1's first study is malignant: the right CC DBT holds a malignant mass
VIEW = "R_CC"
CHANGED = 12  # a screen pixel "changed" when a channel moved by more than this (0-255)
VIEW_TIMEOUT = 90  # seconds for OHIF to show one result (software WebGL on 2 cores)


def _prerequisites() -> list[str]:
    missing = []
    if not DICOMWEB_PLUGIN.exists():
        missing.append(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} (Debian orthanc-dicomweb)")
    if ohif_dist() is None:
        missing.append("the OHIF app: DICOMNODE_OHIF_DIST must name the dist/ folder of "
                       "`npm pack @ohif/app@3.13.2` (see .ci/run)")
    if chromium_binary() is None:
        missing.append("chromium (Debian package chromium)")
    if not websocket_client_available():
        missing.append("the websocket-client Python package (pip install -e '.[test]')")
    return missing


@pytest.fixture
def ohif_prerequisites() -> None:
    missing = _prerequisites()
    if missing:
        message = "OHIF test needs " + "; ".join(missing)
        if REQUIRE_PEERS:
            pytest.fail(message + " (required under DICOMNODE_REQUIRE_PEERS=1)")
        pytest.skip(message)


# ---------------------------------------------------------------------------- DICOM side


def _orthanc_config(root: Path, node_port: int) -> dict:
    """deploy/orthanc/orthanc.json + dicomweb.json as shipped, test paths and ports, and the
    DICOMweb plugin alone (not every plugin of the folder)."""
    config = deploy_config(root, node_port)
    text = (DEPLOY / "dicomweb.json").read_text()
    config.update(json.loads(re.sub(r"(?m)^\s*//.*$", "", text)))
    config["Plugins"] = [str(DICOMWEB_PLUGIN)]
    return config


class Planes:
    """Geometry of an enhanced multi-frame object (SEG, Parametric Map): per frame its
    position, with the shared orientation and pixel spacing."""

    def __init__(self, ds: pydicom.Dataset) -> None:
        shared = ds.SharedFunctionalGroupsSequence[0]
        iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
        self.row_dir, self.col_dir = iop[:3], iop[3:]  # along a row (columns), down (rows)
        self.normal = np.cross(self.row_dir, self.col_dir)
        spacing = shared.PixelMeasuresSequence[0].PixelSpacing
        self.row_spacing, self.col_spacing = float(spacing[0]), float(spacing[1])
        self.positions = np.array([f.PlanePositionSequence[0].ImagePositionPatient
                                   for f in ds.PerFrameFunctionalGroupsSequence], float)
        self.rows, self.columns = int(ds.Rows), int(ds.Columns)

    def nearest_frames(self, world: np.ndarray) -> np.ndarray:
        """Indices of the frames whose plane passes nearest to the world point."""
        distance = np.abs((world - self.positions) @ self.normal)
        return np.flatnonzero(distance <= distance.min() + 1e-3)

    def centre(self, frame: int) -> list[float]:
        p = self.positions[frame]
        return list(p + self.row_dir * self.col_spacing * (self.columns - 1) / 2
                    + self.col_dir * self.row_spacing * (self.rows - 1) / 2)

    def pixel_of(self, world: np.ndarray, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) of the pixel under each world point (..., 3) on a frame's plane,
        -1 where it falls outside the grid."""
        d = world - self.positions[frame]
        col = np.rint(d @ self.row_dir / self.col_spacing).astype(int)
        row = np.rint(d @ self.col_dir / self.row_spacing).astype(int)
        outside = (row < 0) | (row >= self.rows) | (col < 0) | (col >= self.columns)
        row[outside] = -1
        col[outside] = -1
        return row, col


def _fetch(pacs, study_id: str, known: set[str]) -> dict[str, list[pydicom.Dataset]]:
    """The node's results in the study, by SOP class."""
    out: dict[str, list[pydicom.Dataset]] = {}
    for item in pacs.get(f"/studies/{study_id}/instances"):
        if item["ID"] in known:
            continue
        with urllib.request.urlopen(f"{pacs.url}/instances/{item['ID']}/file",
                                    timeout=30) as rsp:
            ds = pydicom.dcmread(io.BytesIO(rsp.read()))
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


# ---------------------------------------------------------------------------- OHIF side

_VIEWPORT_JS = """(() => {
  const e = cornerstone.getEnabledElements()[0];
  if (!e || !e.viewport) return null;
  const vp = e.viewport, r = vp.canvas.getBoundingClientRect();
  return {id: e.viewportId, type: vp.type, rect: [r.left, r.top, r.width, r.height],
          actors: vp.getActors().map(a => a.uid),
          w0: vp.canvasToWorld([0, 0]), wx: vp.canvasToWorld([1, 0]),
          wy: vp.canvasToWorld([0, 1]), focal: vp.getCamera().focalPoint};
})()"""

_SHOW_OVERLAYS_JS = """(async (show) => {
  const vp = cornerstone.getEnabledElements()[0].viewport;
  vp.getActors().slice(1).forEach(a => a.actor.setVisibility(show));
  vp.render();
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return vp.getActors().length;
})(%s)"""

_JUMP_JS = """(async (world) => {
  const vp = cornerstone.getEnabledElements()[0].viewport;
  const ok = vp.jumpToWorld(world);
  vp.render();
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return ok;
})(%s)"""

_TOASTS_JS = "document.querySelectorAll('[data-sonner-toast]').length"

# The viewport shows the fused Parametric Map (image + map actors).
_PM_READY_JS = """(() => { const e = cornerstone.getEnabledElements()[0];
  return !!(e && e.viewport && e.viewport.getActors().length >= 2 &&
    services.displaySetService.getActiveDisplaySets().some(
      d => d.Modality === 'PMAP' && d.isLoaded)); })()"""

# The stack viewport draws, for the image it shows, the labelmap of every segmentation.
_SEG_READY_JS = """(() => { const e = cornerstone.getEnabledElements()[0];
  if (!e || !e.viewport) return false;
  const segs = cornerstoneTools.segmentation.state.getSegmentations();
  const want = segs.flatMap(s => cornerstoneTools.segmentation
    .getCurrentLabelmapImageIdsForViewport(e.viewportId, s.segmentationId) || []);
  const have = e.viewport.getActors().slice(1).map(a => a.referencedId);
  const image = e.viewport.csImage;  // the image drawn, once it has loaded
  return segs.length > 0 && want.length > 0 && want.every(id => have.includes(id)) &&
    !!image && image.imageId === e.viewport.getCurrentImageId(); })()"""

# Marks the viewport object, to notice when OHIF replaces it (it does while loading).
_MARK_JS = """(() => { const vp = cornerstone.getEnabledElements()[0].viewport;
  vp.dicomnodeMark = vp.dicomnodeMark || String(Math.random()); return vp.dicomnodeMark; })()"""

# The first image is drawn in the viewport.
_IMAGE_READY_JS = """(() => { const e = cornerstone.getEnabledElements()[0];
  return !!(e && e.viewport && e.viewport.csImage); })()"""

_DISPLAY_SET_JS = """services.displaySetService.getActiveDisplaySets()
  .some(d => d.SeriesInstanceUID === %s)"""

_LOAD_SERIES_JS = """(() => { const series = %s;
  const d = services.displaySetService.getActiveDisplaySets()
    .find(d => d.SeriesInstanceUID === series);
  const viewportId = cornerstone.getEnabledElements()[0].viewportId;
  services.viewportGridService.setDisplaySetsForViewport(
    {viewportId, displaySetInstanceUIDs: [d.displaySetInstanceUID]});
  return d.displaySetInstanceUID; })()"""

_FOCAL_JS = "cornerstone.getEnabledElements()[0].viewport.getCamera().focalPoint"


def _open(page: Page, base: str, study: str, series: str) -> None:
    """Open the study, then the series into the viewport, as a double click on its
    thumbnail does. (Opening it straight from the URL, initialSeriesInstanceUID=, OHIF
    3.13 now and then re-creates the viewport while the SEG loads and leaves it unable to
    scroll, turned 90 degrees.)"""
    page.navigate(f"{base}/viewer?StudyInstanceUIDs={study}")
    _ready(page, _IMAGE_READY_JS, "the DBT in the viewer")
    page.wait_js(_DISPLAY_SET_JS % json.dumps(series), VIEW_TIMEOUT, f"series {series} listed")
    page.evaluate(_LOAD_SERIES_JS % json.dumps(series))


def _ready(page: Page, ready_js: str, what: str) -> None:
    """ready_js true at two polls a second apart (OHIF re-creates viewports while loading)."""
    deadline = time.monotonic() + VIEW_TIMEOUT
    while True:
        page.wait_js(ready_js, max(1.0, deadline - time.monotonic()), what)
        time.sleep(1.0)
        if page.evaluate(ready_js):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not stay ready")


def _show_frame(page: Page, planes: Planes, frame: int, ready_js: str, what: str) -> None:
    """Scroll the viewport to one frame of a result object (by its position in space)."""
    for _ in range(3):
        _ready(page, ready_js, what)
        try:
            page.evaluate(_JUMP_JS % json.dumps(planes.centre(frame)))
        except CDPError:  # the viewport was re-created under us: once more
            continue
        _ready(page, ready_js, what)
        if frame in planes.nearest_frames(np.array(page.evaluate(_FOCAL_JS))):
            return
    raise AssertionError(f"could not show frame {frame + 1} of the {what}")


def _frame_pair(page: Page, planes: Planes, frame: int, ready_js: str, what: str
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """One frame of a result object on screen with and without its overlay; done again
    when OHIF replaced the viewport (or scrolled it) meanwhile."""
    for _ in range(3):
        _show_frame(page, planes, frame, ready_js, what)
        mark = page.evaluate(_MARK_JS)
        try:
            pair = _overlay_pair(page)
        except CDPError:
            continue
        if (page.evaluate(_MARK_JS) == mark and page.evaluate(ready_js)
                and frame in planes.nearest_frames(np.array(page.evaluate(_FOCAL_JS)))):
            return pair
    raise AssertionError(f"the {what} viewport kept changing under the screenshots")


def _settle(page: Page, viewport: dict, timeout: float = 30.0) -> np.ndarray:
    """A screenshot once the viewport stopped changing and no notification covers it."""
    wait_for(lambda: not page.evaluate(_TOASTS_JS), timeout, "OHIF notifications to close", 0.5)
    x, y, w, h = (int(round(v)) for v in viewport["rect"])
    deadline = time.monotonic() + timeout
    previous = page.screenshot()
    while time.monotonic() < deadline:
        time.sleep(0.7)
        shot = page.screenshot()
        if np.array_equal(shot[y:y + h, x:x + w], previous[y:y + h, x:x + w]):
            return shot
        previous = shot
    raise TimeoutError(f"the viewport kept changing for {timeout:.0f} s")


def _overlay_pair(page: Page) -> tuple[np.ndarray, np.ndarray, dict]:
    """(screen with the overlay, screen with the overlay actors hidden, viewport info)."""
    viewport = page.evaluate(_VIEWPORT_JS)
    with_overlay = _settle(page, viewport)
    page.evaluate(_SHOW_OVERLAYS_JS % "false")
    without = _settle(page, viewport)
    page.evaluate(_SHOW_OVERLAYS_JS % "true")
    _settle(page, viewport)
    return with_overlay, without, viewport


def _screen_world(viewport: dict, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple]:
    """World coordinates of the centre of every screen pixel over the viewport's canvas
    (the canvas-to-world map is affine: a parallel projection), and the canvas box."""
    x, y, w, h = (int(round(v)) for v in viewport["rect"])
    w, h = min(w, shape[1] - x), min(h, shape[0] - y)
    w0, wx, wy = (np.array(viewport[k], float) for k in ("w0", "wx", "wy"))
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    world = w0 + cols[..., None] * (wx - w0) + rows[..., None] * (wy - w0)
    return world, (slice(y, y + h), slice(x, x + w))


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(int) - b.astype(int)).max(axis=-1) > CHANGED


def _save(shot: np.ndarray, name: str, tmp_path: Path, docs: bool = True) -> None:
    """Into the test's tmp dir; and, for the documentation (DICOMNODE_SCREENSHOTS_DIR, e.g.
    docs/screenshots), as a 256-colour PNG a fraction of the size."""
    save_png(shot, tmp_path / "screenshots" / name)
    if docs and os.environ.get("DICOMNODE_SCREENSHOTS_DIR"):
        save_png(shot, Path(os.environ["DICOMNODE_SCREENSHOTS_DIR"]) / name, colours=256)


# ---------------------------------------------------------------------------- the test


def test_ohif_shows_the_results_on_the_dbt(tmp_path: Path, ohif_prerequisites,
                                          synth_study) -> None:
    started = time.monotonic()
    study_dir = synth_study(studies=1, size="small", seed=SEED, modalities=("dbt",))
    image_path = next(study_dir.glob(f"*/dbt/{VIEW}.dcm"))
    finding = next(f for f in json.loads((study_dir / "findings.json").read_text())
                   if f["path"].endswith(f"dbt/{VIEW}.dcm") and f["malignant"])
    node_port = free_port()
    orthanc_root = tmp_path / "orthanc"
    with orthanc(orthanc_root, extra=_orthanc_config(orthanc_root, node_port)) as pacs:
        config = write_config(
            tmp_path / "node.toml", data_dir=tmp_path / "data", port=node_port,
            peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
            models={"dbt": "builtin", "ffdm": "none", "s2d": "none"}, idle_seconds=1.0)
        with node_process(config, port=node_port):
            source_id = pacs.post("/instances", image_path.read_bytes())["ID"]
            study_id = pacs.get(f"/instances/{source_id}/study")["ID"]
            # SR, SEG, the malignant map (the default) and the study's CAD SR
            wait_for(lambda: len(pacs.get(f"/studies/{study_id}/instances")) >= 5, 300,
                     "the node's results in Orthanc", 1)
        results = _fetch(pacs, study_id, {source_id})
        assert sorted((k, len(v)) for k, v in results.items()) == sorted(
            [(SR, 1), (SEG, 1), (PM, 1), (CAD_SR, 1)])
        # the PACS stored the maps as sent: deflated, integer with a real-world mapping
        for ds in (*results[PM], *results[SEG]):
            assert ds.file_meta.TransferSyntaxUID == DEFLATED, ds.SOPClassUID
        study_uid = str(results[SR][0].StudyInstanceUID)
        ours = {str(u) for ds in sum(results.values(), [])
                for u in (ds.SOPInstanceUID, ds.SeriesInstanceUID)}

        report: dict = {"weights": "builtin"}
        failures: list[str] = []  # each view is checked even when another one fails
        with ohif_server(ohif_dist(), pacs.url, tmp_path / "ohif-serve.log") as base, \
                chromium(tmp_path / "chromium.log", width=1600, height=1000) as page:
            for name, check in (
                    ("(a) Parametric Map", lambda: _check_parametric_map(
                        page, base, study_uid, results[PM], finding, tmp_path, report)),
                    ("(b) SEG", lambda: _check_seg(page, base, study_uid, results[SEG][0],
                                                   tmp_path)),
                    ("(c) SR", lambda: _check_sr(page, base, study_uid, results[SR][0],
                                                 tmp_path))):
                try:
                    check()
                except (AssertionError, TimeoutError) as exc:
                    first_line = (str(exc).splitlines() or [""])[0]
                    failures.append(f"{name}: {type(exc).__name__}: {first_line}")
            recorded = page.recorded

    # nothing left 127.0.0.1: every request went to the OHIF server (and through it to
    # Orthanc), or was in-page data
    outside = [u for u in recorded.requests
               if not u.startswith((base + "/", "data:", "blob:", "about:"))]
    words = re.compile(r"Parametric|PMAP|\bSEG\b|Segmentation|\bSR\b|Structured|"
                       r"Measurement|dicomnode|GMIC", re.IGNORECASE)
    ours_errors = [e for e in recorded.errors
                   if words.search(e) or any(uid in e for uid in ours)]
    report.update(seconds=round(time.monotonic() - started, 1), errors=recorded.errors,
                  requests=len(recorded.requests), outside=outside, failed=recorded.failed,
                  failures=failures)
    (tmp_path / "screenshots").mkdir(exist_ok=True)
    (tmp_path / "screenshots" / "summary.json").write_text(json.dumps(report, indent=1))
    assert recorded.requests, "the Network domain recorded no request"
    assert not outside, f"requests that left the OHIF server on 127.0.0.1: {outside[:10]}"
    assert not recorded.failed, f"failed loads: {recorded.failed[:10]}"
    assert not ours_errors, f"console errors about our objects: {ours_errors}"
    assert not failures, "OHIF did not show our results as it should:\n" + "\n".join(failures)


def _check_parametric_map(page: Page, base: str, study: str, pms: list[pydicom.Dataset],
                          finding: dict, tmp_path: Path, report: dict) -> None:
    from scipy import ndimage

    malignant = next(p for p in pms if p.ContentLabel == "MALIG_SAL")
    _open(page, base, study, str(malignant.SeriesInstanceUID))
    _ready(page, _PM_READY_JS, "Parametric Map fused over the DBT")
    shown = page.evaluate(
        "services.displaySetService.getActiveDisplaySets()"
        ".find(d => d.Modality === 'PMAP' && d.isLoaded).SOPInstanceUID")
    # OHIF makes one display set per Parametric Map series, from its first instance
    pm = next(p for p in pms if str(p.SOPInstanceUID) == shown)
    planes = Planes(pm)
    values = real_world_values(pm).astype(np.float32)  # stored levels -> saliency 0-1
    frame = int(np.argmax(values.reshape(len(values), -1).max(axis=1)))  # the hottest slice
    with_pm, without_pm, viewport = _frame_pair(page, planes, frame, _PM_READY_JS,
                                                "Parametric Map")
    assert len(viewport["actors"]) >= 2
    world, box = _screen_world(viewport, with_pm.shape)
    assert frame in planes.nearest_frames(np.array(viewport["focal"])), "not on the slice"
    rows, cols = planes.pixel_of(world, frame)
    inside = rows >= 0
    value = np.where(inside, values[frame][rows, cols], 0.0)
    shot, plain = with_pm[box].astype(int), without_pm[box].astype(int)
    changed = np.abs(shot - plain).max(axis=-1) > CHANGED
    chroma = shot.max(axis=-1) - shot.min(axis=-1)  # the DBT is grey: colour is the overlay
    _save(with_pm, "ohif-parametric-map.png", tmp_path)
    _save(without_pm, "ohif-dbt-plain.png", tmp_path, docs=False)
    (tmp_path / "screenshots" / "pm-viewport.json").write_text(json.dumps(viewport))

    assert inside.sum() > 10000, "the map covers almost none of the viewport"
    # nothing is drawn where there is no map, or where the map is 0 (a few screen pixels
    # away from any non-zero value: the renderer interpolates between map pixels)
    blank = ~ndimage.binary_dilation(value > 0, iterations=4)
    assert blank.sum() == 0 or changed[blank].mean() < 0.005, (
        f"pixels changed where there is no saliency: {changed[blank].mean():.2%}")
    # colour wherever the saliency is clearly above 0 (OHIF shows values x100 on a 0-100
    # rainbow scale whose opacity ramps from 0 to full between 0 and 0.009)
    hot = inside & (value >= 0.1)
    assert hot.sum() > 500, f"too little saliency >= 0.1 on the hottest slice {frame + 1}"
    assert (chroma[hot] > 25).mean() > 0.9, (
        f"the overlay is missing where there is saliency: {(chroma[hot] > 25).mean():.1%} "
        "coloured")
    # the colour follows the value at that very pixel: predicted from (value, grey below)
    # it leaves at most half the error it leaves predicted from the map mirrored
    aligned = _unexplained(shot, plain, value, hot)
    mirrored_values = values[frame][::-1, ::-1][rows, cols]
    mirrored = _unexplained(shot, plain, np.where(inside, mirrored_values, 0.0), hot)
    assert aligned < 0.5 * mirrored, (
        f"the overlay's colours do not follow the map's values at their pixels: unexplained "
        f"variance {aligned:.4f} with the map in place vs {mirrored:.4f} mirrored")
    # where is the heat: the mass's disk on its slice vs the rest of the breast
    on = values[int(finding["frame"])]
    rr, cc = np.mgrid[0:planes.rows, 0:planes.columns]
    disk = (rr - finding["row"]) ** 2 + (cc - finding["col"]) ** 2 <= finding["radius_px"] ** 2
    report.update({"pm_shown": "malignant" if pm is malignant else "benign",
                   "pm_slice_shown": frame + 1, "mass_slice": int(finding["frame"]) + 1,
                   "pm_mean_on_mass": float(on[disk].mean()),
                   "pm_mean_elsewhere": float(on[~disk & (on > 0)].mean())
                   if (~disk & (on > 0)).any() else 0.0,
                   "pm_max": float(values.max()),
                   "pm_unexplained_in_place_vs_mirrored": [aligned, mirrored]})
    # the heat sits on the mass
    assert report["pm_mean_on_mass"] > 2 * report["pm_mean_elsewhere"], report
    assert pm.ContentLabel == "MALIG_SAL", (
        f"opening the malignant saliency's series shows the {pm.ContentLabel} map: OHIF "
        "shows only the first Parametric Map of a series, so each class needs its own series")


def _unexplained(shot: np.ndarray, plain: np.ndarray, value: np.ndarray,
                 where: np.ndarray) -> float:
    """Share of the screen colour's variance over `where` left unexplained when each pixel
    is predicted by the mean colour of the pixels with the same (map value, grey) bins."""
    edges = np.unique(np.quantile(value[where], np.linspace(0, 1, 33)[1:-1]))
    key = (np.digitize(value, edges) * 32 + plain[..., 0] // 8)[where]
    colour = shot[where].astype(float)
    total = ((colour - colour.mean(axis=0)) ** 2).sum()
    order = np.argsort(key, kind="stable")
    key, colour = key[order], colour[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    sums = np.add.reduceat(colour, starts)
    counts = np.diff(np.r_[starts, len(key)])[:, None]
    residual = (colour ** 2).sum() - (sums ** 2 / counts).sum()
    return float(residual / total) if total > 0 else 1.0


def _check_seg(page: Page, base: str, study: str, seg: pydicom.Dataset,
               tmp_path: Path) -> None:
    from scipy import ndimage

    assert seg.SegmentationType == "BINARY"
    _open(page, base, study, str(seg.SeriesInstanceUID))
    planes = Planes(seg)
    masks = seg.pixel_array.reshape(-1, planes.rows, planes.columns).astype(bool)
    # frames of the same plane (one per segment) joined: what the screen shows is the union
    union: dict[int, np.ndarray] = {}
    for index in range(len(masks)):
        first = int(planes.nearest_frames(planes.positions[index])[0])
        union[first] = union.get(first, np.zeros_like(masks[0])) | masks[index]
    assert any(m.any() for m in union.values()), "the SEG flags nothing: nothing to show"
    frame = max(union, key=lambda k: union[k].sum())  # the slice with most flagged pixels
    with_seg, without_seg, viewport = _frame_pair(page, planes, frame, _SEG_READY_JS, "SEG")
    world, box = _screen_world(viewport, with_seg.shape)
    assert frame in planes.nearest_frames(np.array(viewport["focal"])), "not on the slice"
    rows, cols = planes.pixel_of(world, frame)
    inside = rows >= 0
    flagged = np.where(inside, union[frame][rows, cols], False)
    changed = _changed(with_seg[box], without_seg[box])
    _save(with_seg, "ohif-seg.png", tmp_path)

    # a pixel's edge may fall either way on screen: compare away from the mask's border
    near = ndimage.binary_dilation(flagged, iterations=3)
    core = ndimage.binary_erosion(flagged, iterations=3)
    assert core.sum() > 100, "the flagged region is too small on screen to check"
    assert changed[core].mean() > 0.9, (
        f"the SEG is not drawn on its flagged pixels: {changed[core].mean():.1%} changed")
    assert changed[~near].mean() < 0.005, (
        f"pixels changed away from the SEG's flagged pixels: {changed[~near].mean():.2%}")


def _check_sr(page: Page, base: str, study: str, sr: pydicom.Dataset, tmp_path: Path) -> None:
    _open(page, base, study, str(sr.SeriesInstanceUID))
    uid = str(sr.SeriesInstanceUID)
    measurements = page.wait_js(
        "(() => { const d = services.displaySetService.getActiveDisplaySets()"
        f".find(d => d.SeriesInstanceUID === '{uid}' && d.isLoaded); "
        "return d && d.measurements.map(m => ({id: m.TrackingIdentifier, loaded: m.loaded, "
        "frame: m.frameNumber, points: (m.coords[0] || {}).GraphicData || null})); })()",
        VIEW_TIMEOUT, "the SR loaded by OHIF")
    regions = [m for m in measurements if m["points"]]
    assert regions, "OHIF found no region in the SR"
    not_loaded = [m["id"] for m in measurements if not m["loaded"]]
    first = measurements[0]
    assert not not_loaded and first["points"], (
        "OHIF's SR viewport shows the report's first measurement group and loads groups "
        "from the last until one has no image region; these groups were not placed on an "
        f"image: {not_loaded} (first group: {first['id']})")
    page.wait_js("(() => { const e = cornerstone.getEnabledElements()[0]; "
                 "return e && e.viewport && cornerstoneTools.annotation.state"
                 ".getAllAnnotations().length > 0; })()", VIEW_TIMEOUT,
                 "the SR's regions drawn in the SR viewport")
    viewport = page.evaluate(_VIEWPORT_JS)
    shot = _settle(page, viewport)
    _save(shot, "ohif-sr.png", tmp_path)
    shown_frame = page.evaluate(
        "cornerstone.getEnabledElements()[0].viewport.getCurrentImageId()").rsplit("/", 1)[-1]
    assert not shown_frame.isdigit() or int(shown_frame) == int(first["frame"] or 1), (
        f"the SR viewport shows frame {shown_frame}, its first region is on {first['frame']}")
    # the first region's outline, from the SR's own coordinates (column, row on the
    # referenced frame), lands where the viewport draws it: an SVG outline of that box
    points = np.asarray(first["points"], float).reshape(-1, 2)
    expected = page.evaluate(
        "(() => { const vp = cornerstone.getEnabledElements()[0].viewport; "
        "const id = vp.getCurrentImageId(); "
        f"return {json.dumps(points.tolist())}.map(p => vp.worldToCanvas("
        "cornerstone.utilities.imageToWorldCoords(id, p))); })()")
    drawn = page.evaluate(
        "Array.from(document.querySelectorAll('svg [data-annotation-uid], svg polyline, "
        "svg path')).filter(e => e.getBBox && e.getBBox().width > 4).map(e => { "
        "const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; })")
    x0, y0 = viewport["rect"][:2]
    exp = np.asarray(expected, float)
    box = [exp[:, 0].min() + x0, exp[:, 1].min() + y0, exp[:, 0].max() + x0,
           exp[:, 1].max() + y0]
    assert any(np.allclose(d, box, atol=4) for d in drawn), (
        f"no outline drawn at the first region's place {box}; drawn: {drawn[:8]}")
