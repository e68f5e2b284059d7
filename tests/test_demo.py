"""`dicomnode demo` end to end on 127.0.0.1 with random checkpoints (--model-dir): exit 0, a
summary whose probabilities are the returned SRs', one valid PNG per image whose malignant
overlay differs from the plain input where the returned saliency is high; and failures
that end with one `error:` line and nothing left running."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, ParametricMapStorage

from dicomnode.cli import main
from dicomnode.demo.overlay import overlay_layout
from dicomnode.external import port_open
from dicomnode.results.read import read_sr_summary
from tests.support.peers import make_checkpoint

SR = Comprehensive3DSRStorage
PM = ParametricMapStorage
NAMES = {"dbt": "DBT", "ffdm": "FFDM", "s2d": "S2D"}


def _demo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", "demo", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith("ts=")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def _node_port(out: Path) -> int | None:
    log = out / "node" / "node.log"
    match = re.search(r"listening as \S+ on [\d.]+:(\d+)", log.read_text()) if log.exists() \
        else None
    return int(match.group(1)) if match else None


def _references(ds) -> set[str]:
    return {str(r.ReferencedSOPInstanceUID)
            for s in ds.get("ReferencedSeriesSequence", [])
            for r in s.get("ReferencedInstanceSequence", [])} | {
        str(r.ReferencedSOPInstanceUID)
        for e in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    for seed, modality in enumerate(("dbt", "ffdm", "s2d")):
        make_checkpoint(root / f"{modality}.pt", modality, seed=seed)
    return root


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "demo-out"
    proc = _demo("--out", str(out), "--model-dir", str(model_dir), "--timeout", "400")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for stage in ("generating a synthetic study", "starting the node", "sending 12 instances",
                  "sent 12/12", "waiting for the SR", "received 37 objects",
                  "rendering 12 PNG overlays", "Time by stage:"):
        assert stage in text, stage
    port = _node_port(out)
    assert port is not None and not port_open(port), "the node is still listening"

    # What the SRs that came back say, by laterality and by image.
    with (out / "study" / "labels.csv").open(newline="") as fh:
        images = {row["sop_instance_uid"]: row for row in csv.DictReader(fh)}
    breast: dict[str, dict[str, float]] = {}
    per_image: dict[tuple[str, str, str], dict[str, float]] = {}
    pms: dict[str, list[Path]] = {}
    for path in sorted((out / "received").glob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        refs = [images[u] for u in _references(ds) if u in images]
        if str(ds.SOPClassUID) == SR and refs:
            (row,) = refs
            summary = read_sr_summary(dcmread(path))
            breast[row["laterality"]] = summary.probabilities["breast"]
            per_image[(row["modality"], row["laterality"], row["view"])] = \
                summary.probabilities["final"]
        elif str(ds.SOPClassUID) == PM and str(ds.ContentLabel) == "MALIG_SAL":
            (row,) = refs
            pms[f"{row['laterality']}_{row['view']}_{row['modality']}"] = [path]
    assert set(breast) == {"L", "R"} and len(per_image) == 12

    # The summary prints those numbers, per breast and per image.
    for lat, name in (("L", "Left"), ("R", "Right")):
        match = re.search(rf"^{lat} breast \({name}\): malignant (\d\.\d+)  benign (\d\.\d+)",
                          text, re.M)
        assert match, f"no summary line for the {name} breast"
        assert float(match.group(1)) == pytest.approx(breast[lat]["malignant"], abs=6e-4)
        assert float(match.group(2)) == pytest.approx(breast[lat]["benign"], abs=6e-4)
        block = text[match.start():].split("\n" + ("R breast" if lat == "L" else "PNG"), 1)[0]
        assert "model looked at:" in block and "ground truth:" in block
        for (modality, side, view), probs in per_image.items():
            if side != lat:
                continue
            line = re.search(rf"^\s+{NAMES[modality]} {view}\s+malignant (\d\.\d+)  benign "
                             rf"(\d\.\d+)", block, re.M)
            assert line, f"no line for {modality} {side} {view}"
            assert float(line.group(1)) == pytest.approx(probs["malignant"], abs=6e-4)
            assert float(line.group(2)) == pytest.approx(probs["benign"], abs=6e-4)
    # seed 1: the right breast holds a malignant and a benign mass, the left none
    assert "malignant mass" in text and "normal, no finding" in text

    # One PNG per image, valid, laid out as overlay_layout says; the malignant overlay differs
    # from the plain input where the returned saliency is highest.
    pngs = sorted((out / "overlays").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(pms)
    for png in pngs:
        assert str(png) in text
        pm = dcmread(pms[png.stem][0])
        saliency = pm.pixel_array.astype(np.float32)
        saliency = saliency[np.newaxis] if saliency.ndim == 2 else saliency
        shown = saliency[int(np.argmax(saliency.reshape(len(saliency), -1).max(axis=1)))]
        inner = shown[4:-4, 4:-4]  # so that the 5x5 PNG patch below stays in the panel
        row, col = np.array(np.unravel_index(int(np.argmax(inner)), inner.shape)) + 4
        layout = overlay_layout(int(pm.Rows), int(pm.Columns))
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.size == (layout.width, layout.height), png
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        y, x = layout.to_png("malignant", row, col)
        y0, x0 = layout.to_png("input", row, col)
        overlay, plain = pixels[y - 2:y + 3, x - 2:x + 3], pixels[y0 - 2:y0 + 3, x0 - 2:x0 + 3]
        assert inner.max() > 0.1, png
        assert np.abs(overlay - plain).mean() > 0.05, png
        assert np.abs(overlay - overlay.mean(axis=2, keepdims=True)).max() > 0.05, png  # colour
    assert (out / "summary.json").is_file()


def test_missing_builtin_weights_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import dicomnode.pipeline.weights

    monkeypatch.setattr(dicomnode.pipeline.weights, "BUILTIN_DIR", tmp_path / "no-weights")
    for key in [k for k in os.environ if k.startswith("DICOMNODE_")]:
        monkeypatch.delenv(key)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no built-in dbt weights" in line and "--model-dir" in line
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_model_dir_without_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _demo("--out", str(tmp_path / "out"), "--model-dir", str(empty), timeout=120)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "--model-dir" in line and "dbt.pt" in line


def test_a_folder_the_demo_did_not_make_is_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "weights"  # checked to exist before the folder; never loaded
    model_dir.mkdir()
    for modality in ("dbt", "ffdm", "s2d"):
        (model_dir / f"{modality}.pt").write_bytes(b"")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("not the demo's")
    proc = _demo("--out", str(out), "--model-dir", str(model_dir), timeout=120)
    assert proc.returncode == 2
    assert "not empty" in _one_error_line(proc.stderr)
    assert (out / "keep.txt").read_text() == "not the demo's"


def test_a_node_side_failure_names_the_step_and_stops_the_node(tmp_path: Path) -> None:
    """A synthetic-2D checkpoint given as the DBT one: the node fails the study; the demo
    says so in one line, exits 1 and leaves nothing running."""
    weights = tmp_path / "weights"
    weights.mkdir()
    make_checkpoint(weights / "dbt.pt", "s2d")
    out = tmp_path / "out"
    proc = _demo("--out", str(out), "--model-dir", str(weights), "--modalities", "dbt",
                 "--timeout", "120", timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = _one_error_line(proc.stderr)
    assert "demo failed to wait for results: the node failed the study" in line, line
    assert "s2d model" in line, line
    assert "sent 4/4" in proc.stdout
    port = _node_port(out)
    assert port is not None and not port_open(port), "the node is still listening"


def _approx_equal(a: object, b: object, rel: float = 1e-5) -> bool:
    """Equal JSON trees, numbers within `rel` (a rerun may differ in the last float bits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_approx_equal(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_approx_equal(x, y, rel) for x, y in zip(a, b,
                                                                                  strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return a == pytest.approx(b, rel=rel, abs=1e-6)
    return a == b


# the one dciodvfy warning the SRs keep (docs/viewer.md says why): the project's private
# coding scheme, declared in the Coding Scheme Identification Sequence
PRIVATE_SCHEME_WARNING = ("Warning - Unrecognized defined term <99DCMNODE> for value 1 of "
                          "attribute <Coding Scheme Designator>")


@pytest.mark.slow
@pytest.mark.dicom3tools
@pytest.mark.pixelmed
def test_demo_results_mark_only_what_the_model_flags(tmp_path: Path) -> None:
    """The study `make demo` shows (seed 1: a normal left breast, a malignant and a benign
    mass on the right) with the built-in weights: no CAD mark and no finding-coded TID 1500
    group where the saliency stays below the operating points; the CAD summary agrees with
    its impressions; the malignant breast's marks lie on its malignant mass; every SR passes
    dciodvfy and PixelMed; a rerun of the same work gives the same content, same UIDs."""
    import io
    import json
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from dicomnode.config import load_config
    from dicomnode.pipeline.images import load_image
    from dicomnode.pipeline.weights import ModelRegistry
    from dicomnode.pipeline.worker import (
        _default_result_builder,
        _default_study_result_builder,
        analyse_image,
        combine_breasts,
        result_options,
    )
    from dicomnode.results.findings import flagged_regions
    from dicomnode.results.validate import dciodvfy_output, sr_validator_errors
    from tests.support.results import (
        CAD_SR,
        WITH_FINDINGS,
        WITHOUT_FINDINGS,
        cad_marks,
        cad_summary,
        dciodvfy_complaints,
        evidence_uids,
        finding_groups,
    )

    out = tmp_path / "demo-out"
    proc = _demo("--out", str(out), "--timeout", "400")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = load_config(out / "node" / "node.toml", environ={})
    options = result_options(config)
    floor = options.cad_operating_points[-1]
    with (out / "study" / "labels.csv").open(newline="") as fh:
        labels = {row["sop_instance_uid"]: row for row in csv.DictReader(fh)}
    truth = json.loads((out / "study" / "findings.json").read_text())
    received = {p: dcmread(p) for p in sorted((out / "received").glob("*.dcm"))}
    srs = {next(u for u in evidence_uids(ds) if u in labels): (p, ds)
           for p, ds in received.items() if str(ds.SOPClassUID) == SR}
    ((cad_path, cad),) = [(p, ds) for p, ds in received.items()
                          if str(ds.SOPClassUID) == CAD_SR]
    assert len(srs) == 12

    # Rerun the same work in this process: the node's archived sources, weights, config.
    archived = [p for p in (out / "node" / "data" / "archive").rglob("*.dcm")
                if str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) in labels]
    registry = ModelRegistry(config.model)
    analyses = [analyse_image(image, registry.get(image.modality))
                for image in (load_image(p) for p in sorted(archived))]
    assert len(analyses) == 12
    by_uid = {a.image.sop_instance_uids[0]: a for a in analyses}

    # The summary code agrees with the impressions.
    summary_code, impressions = cad_summary(cad)
    assert summary_code == (WITH_FINDINGS if impressions else WITHOUT_FINDINGS)
    marks = cad_marks(cad)

    # Nothing marked or finding-coded where the saliency stays below the operating points.
    peak = {(uid, c): float(a.saliency[:, c].max()) for uid, a in by_uid.items() for c in (0, 1)}
    for uid, (_, sr) in srs.items():
        groups = finding_groups(sr)
        for c in (0, 1):
            if peak[(uid, c)] < options.thresholds[c]:
                assert not [g for g in groups if g[0] == c], (labels[uid], groups)
            else:  # one group per flagged region
                regions = flagged_regions(by_uid[uid], c, options.thresholds[c])
                assert len([g for g in groups if g[0] == c]) == len(regions) >= 1
    for uid in by_uid:
        if labels[uid]["modality"] == "dbt" and peak[(uid, 1)] < floor:
            assert not [m for m in marks if m.sop_instance_uid == uid], labels[uid]
    # seed 1: the normal left breast stays below the floor, so it has no mark, no finding
    left = [u for u in by_uid if labels[u]["laterality"] == "L"]
    assert all(labels[u]["malignant"] == labels[u]["benign"] == "0" for u in left)
    assert all(peak[(u, 1)] < floor for u in left if labels[u]["modality"] == "dbt")
    assert not [m for m in marks if m.sop_instance_uid in left]
    assert not [g for u in left for g in finding_groups(srs[u][1])]

    # The malignant breast is marked, each mark on its malignant mass (in plane and depth).
    right = [m for m in marks if labels[m.sop_instance_uid]["laterality"] == "R"]
    assert right and impressions and summary_code == WITH_FINDINGS
    for mark in right:
        image = by_uid[mark.sop_instance_uid].image
        positions = np.asarray(image.slice_positions, dtype=float)
        between = float(np.linalg.norm(positions[1] - positions[0]))
        frame = image.frame_numbers.index(mark.frame) if mark.frame is not None else 0
        masses = [f for f in truth if f["sop_instance_uid"] == mark.sop_instance_uid
                  and f["malignant"]]
        assert any(np.hypot(mark.row - f["row"], mark.col - f["col"]) <= f["radius_px"]
                   and abs(frame - f["frame"]) * between
                   <= f["radius_px"] * image.pixel_spacing[0] for f in masses), (mark, masses)

    # Every SR and the CAD SR: dciodvfy without errors or warnings (but the explained one),
    # PixelMed's DicomSRValidator without errors.
    paths = [p for p, _ in srs.values()] + [cad_path]
    for path in paths:
        assert dciodvfy_complaints(dciodvfy_output(path)) == [], path
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for path, errors in zip(paths, pool.map(sr_validator_errors, paths), strict=True):
            assert errors == [], path

    # The same content under the same UIDs when the same work runs again.
    build, build_study = _default_result_builder(config), _default_study_result_builder(config)
    breasts = combine_breasts(analyses)
    rebuilt = [ds for a in analyses for ds, _ in build(a, breasts.get(a.image.laterality))]
    job = SimpleNamespace(id=0, study_uid=cad.StudyInstanceUID)
    rebuilt += [ds for ds, _ in build_study(job, analyses)]
    sent = {str(ds.SOPInstanceUID): ds for ds in received.values()}
    assert {str(ds.SOPInstanceUID) for ds in rebuilt} == set(sent)
    for ds in rebuilt:
        if str(ds.SOPClassUID) in (SR, CAD_SR):
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            buffer.seek(0)
            again = [item.to_json_dict() for item in dcmread(buffer).ContentSequence]
            before = [item.to_json_dict() for item in sent[str(ds.SOPInstanceUID)].ContentSequence]
            assert _approx_equal(again, before), ds.SeriesDescription
