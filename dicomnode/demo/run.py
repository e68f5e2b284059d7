"""`run_demo`: synthetic study -> the node (a `dicomnode run` subprocess on 127.0.0.1) over
DICOM -> SR, SEG and Parametric Maps back at the demo's receiver -> summary and PNG overlays.

Every wait is bounded; the node and the receiver are stopped on every path; a failure raises
DemoFailed (or DemoSetupError) naming the step."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicomnode.config import ModelConfig, ResultsConfig
from dicomnode.demo.errors import DemoFailed, DemoSetupError
from dicomnode.demo.network import (
    PACS_AE,
    NodeProcess,
    ResultReceiver,
    node_config_text,
    send_study,
)
from dicomnode.demo.returned import (
    SourceImage,
    collect,
    read_saliency,
    read_segments,
    read_source_pixels,
)
from dicomnode.demo.summary import (
    MODALITY_NAMES,
    BreastReport,
    ImageReport,
    format_summary,
    read_truth,
    view_geometry,
)
from dicomnode.errors import DicomnodeError

MODALITIES = ("dbt", "ffdm", "s2d")
MARKER = ".dicomnode-demo"
SUBFOLDERS = ("study", "node", "received", "overlays")
DEFAULT_TIMEOUT_S = 900.0


@dataclass
class DemoOptions:
    out: Path = Path("demo-out")
    model: ModelConfig = field(default_factory=ModelConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    model_dir: Path | None = None  # dbt.pt, ffdm.pt, s2d.pt: overrides model
    seed: int = 1  # seed 1: a right breast with a malignant and a benign mass
    modalities: tuple[str, ...] = MODALITIES
    timeout_s: float = DEFAULT_TIMEOUT_S
    idle_seconds: float = 2.0  # the node's study-complete idle time


@dataclass
class DemoReport:
    stages: list[tuple[str, float]]
    node_stages: list[tuple[str, float]]
    breasts: list[BreastReport]
    overlays: list[Path]
    received: int
    summary: list[str]


class Progress:
    """One line per event, with the seconds since the demo started; times each stage."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.started = time.monotonic()
        self.stages: list[tuple[str, float]] = []

    def say(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self.started:6.1f}s] {text}")

    @contextmanager
    def stage(self, name: str, step: str, text: str) -> Iterator[None]:
        """Time a stage; an unexpected error in it becomes DemoFailed naming `step`."""
        self.say(text)
        t0 = time.monotonic()
        try:
            yield
        except DicomnodeError:
            raise
        except Exception as exc:
            raise DemoFailed(step, f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.stages.append((name, time.monotonic() - t0))


def resolve_models(model: ModelConfig, model_dir: Path | None, modalities: tuple[str, ...]
                   ) -> ModelConfig:
    """The node's [model]: checked checkpoint files for the demo's modalities, the rest off."""
    from dicomnode.pipeline.weights import BUILTIN_DIR, ModelUnavailable, checkpoint_path

    resolved = dataclasses.replace(model)
    if model_dir is not None and not model_dir.is_dir():
        raise DemoSetupError(f"--model-dir {model_dir} is not a folder; give the folder "
                             "holding dbt.pt, ffdm.pt and s2d.pt")
    for modality in MODALITIES:
        if modality not in modalities:
            setattr(resolved, modality, "none")
            continue
        if model_dir is not None:
            path = model_dir / f"{modality}.pt"
            if not path.is_file():
                raise DemoSetupError(
                    f"--model-dir {model_dir} has no {modality}.pt; put the {modality} "
                    f"checkpoint there (from `dicomnode train`) or leave {modality} out with "
                    "--modalities")
            setattr(resolved, modality, str(path.resolve()))
            continue
        spec = str(getattr(model, modality))
        try:
            path = checkpoint_path(modality, spec)
        except ModelUnavailable:
            if spec == "builtin":
                raise DemoSetupError(
                    f"no built-in {modality} weights in this installation "
                    f"({BUILTIN_DIR / (modality + '.pt')} is missing); pass --model-dir DIR "
                    "holding dbt.pt, ffdm.pt and s2d.pt (checkpoints from `dicomnode "
                    "train`)") from None
            raise DemoSetupError(f"[model] {modality} = {spec!r}: no such checkpoint file; "
                                 "fix the path or pass --model-dir DIR") from None
        if path is None:
            raise DemoSetupError(f"[model] {modality} is switched off ({spec!r}); set a "
                                 f"checkpoint or leave {modality} out with --modalities")
        setattr(resolved, modality, spec if spec == "builtin" else str(path.resolve()))
    return resolved


def prepare_out(out: Path) -> None:
    """A fresh demo folder; refuses a non-empty folder the demo did not make."""
    if out.exists():
        if not out.is_dir():
            raise DemoSetupError(f"--out {out} is a file; give a folder")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise DemoSetupError(f"--out {out} is not empty and was not made by the demo; "
                                 "give a new or empty folder")
        for name in SUBFOLDERS:
            shutil.rmtree(out / name, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("made by `dicomnode demo`; it deletes and rewrites "
                                  f"{', '.join(SUBFOLDERS)} here\n")
    except OSError as exc:
        raise DemoSetupError(f"cannot write to --out {out} ({exc.strerror or exc}); give a "
                             "writable folder") from None


def _sources(record) -> list[SourceImage]:
    return [SourceImage(sop_instance_uid=im.sop_instance_uid, modality=im.modality,
                        laterality=im.laterality, view=im.view, paths=list(im.paths),
                        frame_uids=list(im.frame_sop_instance_uids))
            for im in record.images]


def run_demo(options: DemoOptions, echo: Callable[[str], None]) -> DemoReport:
    from dicomnode.synth import SynthOptions, generate_studies

    progress = Progress(echo)
    out = options.out.absolute()
    model = resolve_models(options.model, options.model_dir, options.modalities)
    prepare_out(out)

    with progress.stage("generate study", "generate the study", "generating a synthetic "
                        f"study (small, seed {options.seed}: {', '.join(options.modalities)})"):
        (record,) = generate_studies(out / "study", SynthOptions(
            studies=1, size="small", seed=options.seed, modalities=options.modalities))
    sources = _sources(record)
    files = [p for s in sources for p in s.paths]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    progress.say(f"  {len(sources)} images ({size_mb:.0f} MB) in {record.folder}")

    node_dir = out / "node"
    node_dir.mkdir(parents=True, exist_ok=True)
    receiver = ResultReceiver(out / "received")
    node = NodeProcess(node_dir / "node.toml", node_dir / "node.log")
    waited: dict[str, float] = {}
    try:
        with progress.stage("start node", "start the node",
                            "starting the node (dicomnode run) on 127.0.0.1"):
            port = receiver.start()
            node.config_path.write_text(node_config_text(
                data_dir=node_dir / "data", receiver_port=port, model=model,
                results=options.results, idle_seconds=options.idle_seconds))
            node_port = node.start(options.timeout_s)
            progress.say(f"  node listening on 127.0.0.1:{node_port}; results go to "
                         f"{PACS_AE} at 127.0.0.1:{port} (log: {node.log_path})")

        by_path = {p: s for s in sources for p in s.paths}

        def sent(n: int, total: int) -> None:
            s = by_path[files[n - 1]]
            progress.say(f"  sent {n}/{total}: {MODALITY_NAMES[s.modality]} {s.laterality} "
                         f"{s.view}")

        with progress.stage("send study", "send the study", f"sending {len(files)} "
                            f"instances to the node as {PACS_AE} (C-STORE)"):
            send_study(files, node_port, progress=sent)

        with progress.stage("wait for results", "wait for results",
                            "waiting for the SR, SEG and Parametric Maps (study complete after "
                            f"{options.idle_seconds:g} s without a new instance)"):
            waited = _wait_for_results(node, receiver, record.study_uid, len(sources),
                                       options.timeout_s, progress)
    finally:
        t0 = time.monotonic()
        try:
            node.stop()
        finally:
            receiver.stop()
            progress.stages.append(("stop node", time.monotonic() - t0))

    with progress.stage("render overlays", "read the results and render the overlays",
                        f"rendering {len(sources)} PNG overlays from the returned Parametric "
                        "Maps, SEGs and SRs"):
        returned = collect([r.path for r in receiver.received], sources)
        missing = [f"{MODALITY_NAMES[i.source.modality]} {i.source.laterality} {i.source.view}"
                   for i in returned.images if not i.complete]
        if missing:
            raise DemoFailed("read the results", f"no SR and Parametric Maps came back for "
                                                 f"{', '.join(missing)}; see {node.log_path}")
        findings, labels = read_truth(out / "study")
        reports = []
        for item in returned.images:  # one image's pixels in memory at a time
            pixels, header = read_source_pixels(item.source)
            report = ImageReport(returned=item, depth=pixels.shape[0],
                                 geometry=view_geometry(header, item.source.laterality,
                                                        item.source.view, *pixels.shape[1:]),
                                 truth=findings.get(item.source.sop_instance_uid, []))
            report.overlay = _render(report, pixels, out / "overlays")
            reports.append(report)
    breasts = []
    for laterality in ("L", "R"):
        images = [r for r in reports if r.returned.source.laterality == laterality]
        breast_labels = {"benign": 0, "malignant": 0}
        for r in images:
            for key, value in labels.get(r.returned.source.sop_instance_uid, {}).items():
                breast_labels[key] = max(breast_labels[key], value)
        if images:
            breasts.append(BreastReport(laterality, images, breast_labels))
    node_stages = _node_stages(node, waited)
    report = DemoReport(stages=progress.stages, node_stages=node_stages, breasts=breasts,
                        overlays=[r.overlay for r in reports if r.overlay is not None],
                        received=len(receiver.received), summary=format_summary(breasts))
    _write_summary(out, report, record.study_uid)
    return report


_ANALYSED = re.compile(r"event=image_analysed ")


def _wait_for_results(node: NodeProcess, receiver: ResultReceiver, study_uid: str,
                      images: int, timeout_s: float, progress: Progress) -> dict[str, float]:
    """Until the node's job is done and every result it queued for the demo's PACS has
    arrived; returns node-side times. Fails fast when the node fails the study or dies."""
    from dicomnode.config import load_config
    from dicomnode.wiring import open_store, storage_errors

    step = "wait for results"
    config = load_config(node.config_path, environ={})
    with storage_errors():
        store = open_store(config, create_schema=False)
    deadline = time.monotonic() + timeout_s
    shown: tuple = ()
    last_line = time.monotonic()
    try:
        while True:
            if not node.alive():
                raise DemoFailed(step, f"the node exited with status {node.proc.returncode}: "
                                       f"{node.last_error()} (log: {node.log_path})")
            job = next((j for j in store.list_jobs(limit=50) if j.study_uid == study_uid), None)
            state = job.state.value if job is not None else "receiving"
            if state in ("failed", "cancelled"):
                raise DemoFailed(step, f"the node {state} the study: {job.last_error} "
                                       f"(log: {node.log_path})")
            received = len(receiver.received)
            deliveries = [d for d in store.list_deliveries(limit=10_000)
                          if d.destination == PACS_AE]
            dead = [d for d in deliveries if d.state.value == "dead"]
            if dead:
                raise DemoFailed(step, f"the node could not send {len(dead)} results back: "
                                       f"{dead[0].last_error or dead[0].last_status}")
            built = len(store.study_results(study_uid))
            analysed = sum(1 for line in node.log_lines() if _ANALYSED.search(line))
            if (state == "done" and deliveries
                    and all(d.state.value == "done" for d in deliveries)
                    and received >= len(deliveries)):
                progress.say(f"  received {received} objects (SR, SEG, Parametric Maps, "
                             "CAD SR)")
                times = _job_times(job)
                last = max(r.at for r in receiver.received)
                if job.finished_at is not None:  # job done -> last result in, wall clock
                    finished = job.finished_at if job.finished_at.tzinfo else \
                        job.finished_at.replace(tzinfo=dt.UTC)
                    arrived = dt.datetime.now(dt.UTC) - dt.timedelta(
                        seconds=time.monotonic() - last)
                    times["send results back"] = max(0.0, (arrived - finished).total_seconds())
                return times
            now = time.monotonic()
            status = (state, analysed, built // 10, received // 10)
            if status != shown or now - last_line >= 10:
                detail = {"receiving": "study not complete yet",
                          "queued": "study complete, queued for the model"}.get(state, "")
                if state == "running":
                    detail = (f"model: {analysed}/{images} images analysed"
                              + (f", {built} results built" if built else ""))
                elif state == "done":
                    detail = f"{built} results built, sending them back"
                progress.say(f"  job {state}: {detail}; received {received}")
                shown, last_line = status, now
            if now > deadline:
                raise DemoFailed(step, f"timed out after {timeout_s:.0f} s (job {state}, "
                                       f"{received} results received; log: {node.log_path}); "
                                       "raise --timeout on a slow machine")
            time.sleep(0.3)
    finally:
        store.close()


def _job_times(job) -> dict[str, float]:
    times: dict[str, float] = {}
    if job.queued_at and job.last_instance_at:
        times["study complete (idle wait)"] = (job.queued_at - job.last_instance_at
                                               ).total_seconds()
    if job.started_at and job.queued_at:
        times["queued"] = (job.started_at - job.queued_at).total_seconds()
    if job.finished_at and job.started_at:
        times["job"] = (job.finished_at - job.started_at).total_seconds()
    return times


_JOB_DONE = re.compile(r"event=job_done .*load_s=([\d.]+) model_s=([\d.]+) results_s=([\d.]+)")


def _node_stages(node: NodeProcess, waited: dict[str, float]) -> list[tuple[str, float]]:
    """The node's own split of the wait: from its job record and its job_done log event."""
    stages = [(name, s) for name, s in waited.items()
              if name not in ("job", "send results back")]
    match = next((m for m in map(_JOB_DONE.search, reversed(node.log_lines())) if m), None)
    if match:
        load, model, results = map(float, match.groups())
        stages += [("load images", load), ("model (CPU/GPU)", model),
                   ("build SR/SEG/PM (after the model)", results)]
    elif "job" in waited:
        stages.append(("job (load, model, results)", waited["job"]))
    if "send results back" in waited:
        stages.append(("send results back", waited["send results back"]))
    return stages


def _truth_markers(report: ImageReport):
    from dicomnode.demo.overlay import Marker

    markers = []
    for t in report.truth:
        label = t.kind + (f" (slice {t.slice_index + 1})" if t.slice_index is not None
                          and report.depth > 1 else "")
        markers.append(Marker(t.row, t.col, t.radius_px, label, t.malignant))
    return markers


def _render(report: ImageReport, pixels: np.ndarray, folder: Path) -> Path:
    """The PNG of one image from its returned PMs, SEG and SR; sets the saliency peaks."""
    from dicomnode.demo.overlay import Box, OverlayImage, render_overlay

    item = report.returned
    depth = report.depth
    malignant = read_saliency(item.pm_paths["malignant"], item.source, depth)
    # the benign map comes back only on request ([results] parametric_maps)
    benign = (read_saliency(item.pm_paths["benign"], item.source, depth)
              if "benign" in item.pm_paths else np.zeros_like(malignant))
    m_slice = int(np.argmax(malignant.reshape(depth, -1).max(axis=1)))
    b_slice = int(np.argmax(benign.reshape(depth, -1).max(axis=1)))
    report.peak_malignant, report.peak_malignant_slice = float(malignant.max()), m_slice
    report.peak_benign, report.peak_benign_slice = float(benign.max()), b_slice
    segments = (read_segments(item.seg_path, item.source, pixels.shape)
                if item.seg_path is not None else {})
    s = item.source
    name = f"{s.laterality} {s.view} {MODALITY_NAMES[s.modality]}"
    summary = item.summary
    final = summary.probabilities.get("final", {})
    breast = summary.probabilities.get("breast")
    on = (lambda k: f", slice {k + 1} of {depth}") if depth > 1 else (lambda k: "")
    boxes = [Box(r.row0, r.col0, r.row1, r.col1, f"#{n}",
                 f"#{n} attention {r.attention:.2f}"
                 + (f", slice {r.slice_index + 1}" if depth > 1 else ""),
                 on_shown_slice=depth == 1 or r.slice_index == m_slice)
             for n, r in enumerate(item.regions, 1)]
    truth = ", ".join(f"{t.kind}" for t in report.truth) or "no finding"
    flagged = {k: int(v.sum()) for k, v in segments.items()}
    data = OverlayImage(
        title=(f"{name}: malignant {final.get('malignant', float('nan')):.3f}, benign "
               f"{final.get('benign', float('nan')):.3f} (returned SR)"),
        subtitle=(f"{s.laterality} breast: malignant {breast['malignant']:.3f}, benign "
                  f"{breast['benign']:.3f}" if breast else "") +
                 f"   |   ground truth: {truth}"
                 + (" (dotted circles)" if report.truth else ""),
        image=pixels[m_slice],
        input_title=f"input{on(m_slice)}\n(where malignant saliency peaks)" if depth > 1
        else "input\n",
        boxes=boxes,
        patches_title=(f"patch map: {len(boxes)} attended patches (SR)\n"
                       + ("solid: on this slice, dashed: on other slices" if depth > 1
                          else "most attended first")),
        benign_image=pixels[b_slice],
        benign=benign[b_slice],
        benign_title=((f"benign saliency (PM){on(b_slice)}\nmax {report.peak_benign:.2f}"
                       if "benign" in item.pm_paths else
                       "benign saliency: not sent\n([results] parametric_maps)")
                      + (f", SEG {flagged['benign']} px" if "benign" in flagged else "")),
        malignant=malignant[m_slice],
        malignant_title=(f"malignant saliency (PM){on(m_slice)}\nmax "
                         f"{report.peak_malignant:.2f}"
                         + (f", SEG {flagged['malignant']} px" if "malignant" in flagged
                            else "")),
        benign_outline=segments["benign"][b_slice] if "benign" in segments else None,
        malignant_outline=segments["malignant"][m_slice] if "malignant" in segments else None,
        truth=_truth_markers(report),
    )
    path = folder / f"{s.laterality}_{s.view}_{s.modality}.png"
    render_overlay(path, data)
    return path


def _write_summary(out: Path, report: DemoReport, study_uid: str) -> None:
    (out / "summary.txt").write_text("\n".join(report.summary) + "\n")
    breasts = []
    for breast in report.breasts:
        images = []
        for image in breast.images:
            s, summary, top = image.returned.source, image.returned.summary, image.top
            images.append({
                "modality": s.modality, "laterality": s.laterality, "view": s.view,
                "sop_instance_uid": s.sop_instance_uid,
                "sr": str(image.returned.sr_path),
                "probabilities": summary.probabilities.get("final") if summary else None,
                "top_patch": None if top is None else {
                    "slice": top.slice_index + 1, "rows": [top.row0, top.row1],
                    "cols": [top.col0, top.col1], "attention": top.attention,
                    "where": image.top_location.words if image.top_location else None},
                "peak_malignant_saliency": image.peak_malignant,
                "peak_malignant_slice": image.peak_malignant_slice + 1,
                "overlay": str(image.overlay) if image.overlay else None,
                "truth": [dataclasses.asdict(t) for t in image.truth]})
        breasts.append({"laterality": breast.laterality,
                        "probabilities": breast.probabilities(),
                        "looked_at": breast.model_quadrant()[0],
                        "labels": breast.labels, "truth_quadrant": breast.truth_quadrant(),
                        "images": images})
    payload = {"study_uid": study_uid, "received": report.received, "breasts": breasts,
               "stages_s": dict(report.stages), "node_stages_s": dict(report.node_stages)}
    (out / "summary.json").write_text(json.dumps(payload, indent=1))
