"""The inference worker: claims ready studies, runs the model on every breast image, builds
the SR, SEG and Parametric Map, archives them and queues their delivery.

Several workers (threads, processes or machines sharing a PostgreSQL queue) can run at
once: storage hands each job to exactly one of them under a lease that the worker renews
while it works; a worker that dies loses its lease and the job runs again elsewhere.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicomnode import metrics
from dicomnode.analysis import (
    BENIGN,
    MALIGNANT,
    AttendedRegion,
    BreastAnalysis,
    ClassProbabilities,
    ImageAnalysis,
)
from dicomnode.errors import DicomnodeError, UnusableImageError
from dicomnode.logs import kv
from dicomnode.models import LoadedModel, ModelRegistry, ModelUnavailable
from dicomnode.volume import BreastImage, ImageHeader, read_pixels, scan_images

if TYPE_CHECKING:
    from dicomnode.config import Config
    from storage import Store
    from storage.records import Job

log = logging.getLogger("dicomnode.worker")


class JobFailed(DicomnodeError):
    """The study cannot be processed as it is (no usable image, no model): not retried."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# -------------------------------------------------------------------------- inference


def _probabilities(values: np.ndarray) -> ClassProbabilities:
    return ClassProbabilities(benign=float(values[BENIGN]), malignant=float(values[MALIGNANT]))


def analyse_image(image: BreastImage, loaded: LoadedModel, *, dtype: str = "fp32"
                  ) -> ImageAnalysis:
    """Preprocess one image, run the model, and express the result on the source image.

    Where the model's identity says so (test_time_augmentations > 0), the final scores are
    the mean over that many shifted and resized copies; everything drawn on the image comes
    from the plain pass, whose geometry is the source image's."""
    import torch

    from gmic.model import predict, predict_augmented
    from gmic.preprocess import preprocess

    cfg = loaded.model.cfg
    model_input, transform = preprocess(image.pixels, image.modality, image.laterality,
                                        input_size=cfg.input_size)
    volume = torch.from_numpy(model_input)
    output = predict(loaded.model, volume, dtype=dtype)
    final = output.y.float().cpu()
    copies = loaded.identity.test_time_augmentations
    if copies > 0:
        final = predict_augmented(loaded.model, volume, copies, loaded.identity.augment_px,
                                  dtype=dtype)
    crop_h, crop_w = cfg.crop_size
    regions = []
    for (frame, row, col), weight in zip(output.crop_positions.tolist(),
                                         output.attention.float().tolist(), strict=True):
        r0, c0, h, w = transform.to_source_box(int(row), int(col), crop_h, crop_w)
        regions.append(AttendedRegion(int(frame), r0, c0, h, w, float(weight)))
    return ImageAnalysis(
        image=image, algorithm=loaded.identity,
        final=_probabilities(final.numpy()),
        global_=_probabilities(output.y_global.float().cpu().numpy()),
        local=_probabilities(output.y_local.float().cpu().numpy()),
        regions=regions, saliency=output.saliency.float().cpu().numpy(), transform=transform)


def combine_breasts(analyses: list[ImageAnalysis]) -> dict[str, BreastAnalysis]:
    """Per breast: mean over its views within a modality, then mean over modalities
    (the paper's breast-wise predictions and modality ensembles)."""
    by_breast: dict[str, dict[str, list[ImageAnalysis]]] = defaultdict(lambda: defaultdict(list))
    for a in analyses:
        by_breast[a.image.laterality][a.image.modality].append(a)
    breasts = {}
    for laterality, by_modality in sorted(by_breast.items()):
        per_modality = {
            modality: ClassProbabilities(
                benign=float(np.mean([a.final.benign for a in items])),
                malignant=float(np.mean([a.final.malignant for a in items])))
            for modality, items in sorted(by_modality.items())}
        final = ClassProbabilities(
            benign=float(np.mean([p.benign for p in per_modality.values()])),
            malignant=float(np.mean([p.malignant for p in per_modality.values()])))
        images = [a for items in by_modality.values() for a in items]
        breasts[laterality] = BreastAnalysis(laterality, final, per_modality, images)
    return breasts


def usable_headers(paths: list[Path]) -> tuple[list[ImageHeader], list[str]]:
    """Headers of the breast images among the study's files, and why others were left out.

    One unusable image does not stop the study: the files are scanned together (a
    single-frame DBT series needs all its slices), and on an error the offending files are
    found one by one and left out.
    """
    try:
        return scan_images(paths), []
    except UnusableImageError:
        pass
    problems, good = [], []
    for path in paths:
        try:
            scan_images([path])
            good.append(path)
        except UnusableImageError as exc:
            problems.append(str(exc))
    try:
        return scan_images(good), problems
    except UnusableImageError as exc:  # e.g. a series whose slices differ in size
        return [], [*problems, str(exc)]


# ---------------------------------------------------------------------------- the loop


@dataclass
class StageTimes:
    """Seconds per stage of one job (logged, and used by `bench e2e`)."""

    load: float = 0.0
    model: float = 0.0
    results: float = 0.0
    images: int = 0
    skipped: list[str] = field(default_factory=list)


class Worker:
    def __init__(self, config: Config, store: Store, *, models: ModelRegistry | None = None,
                 name: str | None = None,
                 result_builder: Callable[..., list] | None = None,
                 study_result_builder: Callable[..., list] | None = None) -> None:
        from dicomnode.scu import Deliverer, destinations_from_config

        self.config = config
        self.store = store
        self.models = models or ModelRegistry(config.model)
        self.id = name or worker_id()
        self.destinations = destinations_from_config(config)
        self.deliverer = Deliverer(store, config.node.ae_title, self.destinations, self.id)
        self._build = result_builder or _default_result_builder(config)
        self._build_study = study_result_builder or _default_study_result_builder(config)
        self._stop = threading.Event()
        self.jobs_done = 0
        self.jobs_failed = 0
        self.last_times: StageTimes | None = None

    def stop(self) -> None:
        self._stop.set()

    def run_forever(self) -> None:
        log.info("event=worker_started %s", kv(worker=self.id))
        idle_by_ae = {p.ae_title: p.idle_seconds for p in self.config.peers
                      if p.idle_seconds is not None}
        while not self._stop.is_set():
            worked = False
            try:
                self.store.mark_ready(idle_seconds=self.config.node.idle_seconds,
                                      idle_seconds_by_ae=idle_by_ae)
                worked |= self.run_one_job()
                worked |= self.deliverer.run_once() > 0
            except Exception:  # keep serving: a database hiccup must not end the worker
                log.exception("event=worker_loop_error %s", kv(worker=self.id))
            if not worked:
                self._stop.wait(self.config.worker.poll_seconds)
        log.info("event=worker_stopped %s", kv(worker=self.id))

    def run_one_job(self) -> bool:
        """Claim and process one job; False when none was ready."""
        job = self.store.claim_job(self.id, lease_seconds=self.config.worker.lease_seconds)
        if job is None:
            return False
        started = time.perf_counter()
        if job.queued_at is not None:
            from storage.store import utcnow

            waited = (utcnow() - job.queued_at).total_seconds()
            metrics.JOB_STAGE_SECONDS.observe(max(0.0, waited), stage="wait")
        log.info("event=job_started %s", kv(job=job.id, study_uid=job.study_uid,
                                            attempt=job.attempts, worker=self.id))
        try:
            times = self.process(job)
        except (JobFailed, ModelUnavailable) as exc:
            self._fail(job, str(exc), retry=False)
            return True
        except Exception as exc:
            log.exception("event=job_error %s", kv(job=job.id, study_uid=job.study_uid))
            self._fail(job, f"{type(exc).__name__}: {exc}", retry=True)
            return True
        from storage.errors import LeaseLost

        try:
            self.store.complete_job(job.id, self.id)
        except LeaseLost:
            log.warning("event=lease_lost %s", kv(job=job.id, study_uid=job.study_uid))
            return True
        self.jobs_done += 1
        self.last_times = times
        total = time.perf_counter() - started
        metrics.JOBS.inc(outcome="done")
        for stage, seconds in (("load", times.load), ("model", times.model),
                               ("results", times.results), ("total", total)):
            metrics.JOB_STAGE_SECONDS.observe(seconds, stage=stage)
        log.info("event=job_done %s", kv(
            job=job.id, study_uid=job.study_uid, images=times.images,
            load_s=round(times.load, 2), model_s=round(times.model, 2),
            results_s=round(times.results, 2),
            total_s=round(total, 2), skipped=len(times.skipped)))
        return True

    def _fail(self, job: Job, error: str, *, retry: bool) -> None:
        from storage.errors import LeaseLost

        self.jobs_failed += 1
        metrics.JOBS.inc(outcome="retry" if retry else "failed")
        log.error("event=job_failed %s", kv(job=job.id, study_uid=job.study_uid, retry=retry,
                                            error=error))
        try:
            self.store.fail_job(job.id, self.id, error, retry=retry)
        except LeaseLost:
            pass

    def _renew(self, job: Job) -> None:
        self.store.renew_lease(job.id, self.id, lease_seconds=self.config.worker.lease_seconds)

    def process(self, job: Job) -> StageTimes:
        times = StageTimes()
        paths = [i.path for i in self.store.study_instances(job.study_uid)]
        headers, times.skipped = usable_headers(paths)
        for problem in times.skipped:
            log.warning("event=image_skipped %s", kv(job=job.id, reason=problem))
        if not headers:
            raise JobFailed(f"study {job.study_uid} has no usable breast image"
                            + (f": {times.skipped[0]}" if times.skipped else ""))
        # Fail early and clearly when no modality of the study has a model.
        models: dict[str, LoadedModel] = {}
        unavailable: list[str] = []
        for modality in sorted({h.modality for h in headers}):
            try:
                loaded = self.models.get(modality)
            except ModelUnavailable as exc:
                unavailable.append(str(exc))
                continue
            if loaded is not None:
                models[modality] = loaded
                metrics.MODELS_LOADED.set(1, modality=modality, device=str(loaded.device))
        if not models:
            raise JobFailed("; ".join(unavailable) or
                            f"study {job.study_uid}: every modality it holds is switched off "
                            "in [model]")
        for problem in unavailable:
            log.warning("event=modality_skipped %s", kv(job=job.id, reason=problem))

        analyses: list[ImageAnalysis] = []
        for header in headers:
            loaded = models.get(header.modality)
            if loaded is None:
                continue
            t0 = time.perf_counter()
            try:
                image = read_pixels(header)
            except UnusableImageError as exc:
                times.skipped.append(str(exc))
                log.warning("event=image_skipped %s", kv(job=job.id, reason=exc))
                continue
            t1 = time.perf_counter()
            analyses.append(analyse_image(image, loaded))
            t2 = time.perf_counter()
            times.load += t1 - t0
            times.model += t2 - t1
            times.images += 1
            metrics.MODEL_SECONDS.inc(t2 - t1, modality=image.modality)
            metrics.IMAGES_ANALYSED.inc(modality=image.modality)
            log.info("event=image_analysed %s", kv(
                job=job.id, sop_instance_uid=image.sop_instance_uids[0], modality=image.modality,
                laterality=image.laterality, view=image.view,
                malignant=round(analyses[-1].final.malignant, 4),
                benign=round(analyses[-1].final.benign, 4), model_s=round(t2 - t1, 2)))
            self._renew(job)
        if not analyses:
            raise JobFailed(f"study {job.study_uid}: no image could be read: {times.skipped[0]}")

        t0 = time.perf_counter()
        breasts = combine_breasts(analyses)
        destinations = self._destinations_for(job)
        for analysis in analyses:
            for dataset, kind in self._build(analysis, breasts.get(analysis.image.laterality)):
                self._archive_and_queue(job, dataset, kind, destinations)
            analysis.saliency = analysis.saliency[:0]  # free memory early on large studies
            self._renew(job)
        for dataset, kind in self._build_study(job, analyses):  # the study's CAD SR
            self._archive_and_queue(job, dataset, kind, destinations)
        times.results = time.perf_counter() - t0
        return times

    def _destinations_for(self, job: Job) -> list[str]:
        """Back to the calling AE when it is a configured peer that takes results; else to
        every peer configured to take them."""
        if job.calling_ae and job.calling_ae in self.destinations:
            return [job.calling_ae]
        return sorted(self.destinations)

    def _archive_and_queue(self, job: Job, dataset, kind: str, destinations: list[str]) -> None:
        import io

        from pydicom import dcmwrite

        buffer = io.BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        result = self.store.store_result(
            encoded=buffer.getvalue(), sop_instance_uid=str(dataset.SOPInstanceUID),
            sop_class_uid=str(dataset.SOPClassUID), study_uid=str(dataset.StudyInstanceUID),
            series_uid=str(dataset.SeriesInstanceUID),
            transfer_syntax=str(dataset.file_meta.TransferSyntaxUID), kind=kind, job_id=job.id)
        for destination in destinations:
            self.store.enqueue_delivery(result.id, destination)
        log.info("event=result_stored %s", kv(job=job.id, kind=kind,
                                              sop_instance_uid=dataset.SOPInstanceUID,
                                              destinations=",".join(destinations) or "none"))


RESULT_KINDS = {
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.30": "pmap",
    "1.2.840.10008.5.1.4.1.1.88.50": "cad-sr",
}


def result_options(config: Config):
    from dicomnode.results import ResultOptions

    results = config.results
    return ResultOptions(
        thresholds=(results.benign_operating_point, results.malignant_operating_point),
        seg_type=results.segmentation, max_array_bytes=results.max_array_mb * 2**20,
        pmap_classes=results.pmap_classes, pmap_values=results.map_values,
        deflate=results.deflate)


def _default_result_builder(config: Config) -> Callable:
    """(ImageAnalysis, BreastAnalysis | None) -> [(dataset, kind), ...]: the SEG, the
    Parametric Maps and the SR of one image, with the configured operating points."""
    from dicomnode.results import build_results

    options = result_options(config)

    def build(analysis: ImageAnalysis, breast: BreastAnalysis | None) -> list:
        datasets = build_results(analysis, breast, options).datasets
        return [(ds, RESULT_KINDS.get(str(ds.SOPClassUID), "other")) for ds in datasets]

    return build


def _source_header(analysis: ImageAnalysis):
    """The first source file's header (no pixels), or None when it cannot be read."""
    import pydicom

    try:
        return pydicom.dcmread(analysis.image.source_paths[0], stop_before_pixels=True)
    except (IndexError, OSError, pydicom.errors.InvalidDicomError):
        return None


def _default_study_result_builder(config: Config) -> Callable:
    """(Job, [ImageAnalysis]) -> [(dataset, kind), ...]: the Mammography CAD SR of the
    study's DBT images, when [results] cad_sr is on and the study has DBT. One that cannot
    be built is logged and left out: the per-image results are already queued."""
    from dicomnode.results import ResultsError, identify_result
    from dicomnode.results.cad_sr import build_cad_sr

    options = result_options(config)

    def build(job: Job, analyses: list[ImageAnalysis]) -> list:
        dbt = [a for a in analyses if a.image.modality == "dbt"]
        if not config.results.cad_sr or not dbt:
            return []
        try:
            ds = build_cad_sr(dbt, options)
            # IHE AIR identification, as on every result (build_results does the others)
            identify_result(ds, dbt[0].algorithm, _source_header(dbt[0]))
        except ResultsError as exc:
            log.error("event=cad_sr_failed %s", kv(job=job.id, study_uid=job.study_uid,
                                                    error=exc))
            return []
        return [(ds, RESULT_KINDS[str(ds.SOPClassUID)])]

    return build
