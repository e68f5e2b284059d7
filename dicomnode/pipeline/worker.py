"""The inference worker: claims ready studies, runs the model on every breast image, builds
the SR, SEG and Parametric Map, archives them and queues their delivery.

A job goes through named stages (:meth:`Worker.process`):

1. ``find_images``: the study's archived files -> the usable breast images' headers
   (:class:`~dicomnode.pipeline.images.ImageHeader`), images left out recorded;
2. ``select_models``: the headers' modalities -> the loaded weights per modality;
3. ``analyse_images``: each image's pixels loaded and run through the model ->
   :class:`~dicomnode.pipeline.analysis.ImageAnalysis` per image, one breast after the
   other; as soon as a breast's images are all analysed they go to
4. ``build_image_results``: their result objects (an :class:`ImageResultBuilder`) built,
   encoded and staged in the archive's temporary area, on a results thread while the next
   breast is analysed (``[worker] result_threads``; the model's wait for the results
   shrinks to the last breast's);
5. ``queue_results``: once every image is analysed, the staged objects stored (indexed)
   and their deliveries queued, image by image; then the study's own (a
   :class:`StudyResultBuilder`, the CAD SR) -> the SOP Instance UIDs produced, from which
   earlier runs' results are superseded. Nothing is stored or queued before this stage,
   so a job that fails while analysing leaves no partial results behind (and its staged
   files are discarded).

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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from dicomnode.errors import DicomnodeError, UnusableImageError
from dicomnode.identifiers import RESULT_KINDS
from dicomnode.ops import prometheus
from dicomnode.ops.logs import kv
from dicomnode.ops.retention import RetentionSchedule
from dicomnode.pipeline.analysis import (
    BreastAnalysis,
    ClassProbabilities,
    ImageAnalysis,
)
from dicomnode.pipeline.images import ImageHeader, read_pixels, scan_images
from dicomnode.pipeline.inference import analyse_image
from dicomnode.pipeline.weights import LoadedModel, ModelRegistry, ModelUnavailable

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dicomnode.config import Config
    from dicomnode.results import ResultOptions
    from storage import Job, Store, TempFile

log = logging.getLogger("dicomnode.worker")


class JobFailed(DicomnodeError):
    """The study cannot be processed as it is (no usable image, no model): not retried."""


# A result object and its kind ("sr", "seg", "pmap", "cad-sr"; identifiers.RESULT_KINDS).
ResultObject = tuple["Dataset", str]


class ImageResultBuilder(Protocol):
    """One image's result objects (SEG, Parametric Maps, SR), given its analysis and its
    breast's combined analysis (None where the breast has none)."""

    def __call__(self, analysis: ImageAnalysis, breast: BreastAnalysis | None,
                 /) -> list[ResultObject]: ...


class StudyResultBuilder(Protocol):
    """The study's own result objects (the CAD SR), given the analyses that got results and
    the reasons the study's other images were left out."""

    def __call__(self, job: Job, analyses: list[ImageAnalysis], left_out: Sequence[str] = (),
                 /) -> list[ResultObject]: ...


# The worker ids made in this process: a lease owner with this process's id that is not
# among them belonged to a previous process that had the same pid (a restarted container).
_OWN_IDS: set[str] = set()


def worker_id() -> str:
    """host:pid:nonce. The host and pid let a restarted node tell which leases belonged to
    workers of its own machine that are gone (see :func:`dead_workers`)."""
    name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    _OWN_IDS.add(name)
    return name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def dead_workers(owners: set[str]) -> set[str]:
    """The lease owners known to be dead: workers of this host whose process is gone, or
    that had this process's pid before (a container restarted with pid 1). Owners on other
    hosts, with other id formats, or whose pid is alive (maybe reused) are left to their
    lease expiry: never taken from a worker that may still be sending."""
    host, me = socket.gethostname(), os.getpid()
    dead = set()
    for owner in owners:
        parts = owner.rsplit(":", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if (pid == me and owner not in _OWN_IDS) or (pid != me and not _pid_alive(pid)):
            dead.add(owner)
    return dead


# -------------------------------------------------------------------------- inference


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
    """Seconds per stage of one job (logged, and used by `bench e2e`). `results` is what
    the job took after its last image was analysed (the wait the model's end leaves);
    `building` all the time spent building and encoding result objects, most of it on the
    results thread while later images were analysed."""

    load: float = 0.0
    model: float = 0.0
    results: float = 0.0
    building: float = 0.0
    images: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass
class StagedResult:
    """A result object written to the archive's temporary area (Store.stage_result), ready
    to be stored, with what storage indexes it by."""

    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    file: TempFile
    stored: bool = False

    @classmethod
    def write(cls, store: Store, dataset: Dataset, kind: str, level: int) -> StagedResult:
        """`dataset` encoded (deflated maps in parallel blocks at `level`, encode.py) and
        staged: its bytes on disk, not in memory, until the job stores it."""
        from dicomnode.results.encode import encode_result

        return cls(kind=kind, sop_instance_uid=str(dataset.SOPInstanceUID),
                   sop_class_uid=str(dataset.SOPClassUID),
                   study_uid=str(dataset.StudyInstanceUID),
                   series_uid=str(dataset.SeriesInstanceUID),
                   transfer_syntax=str(dataset.file_meta.TransferSyntaxUID),
                   file=store.stage_result(encode_result(dataset, level=level)))


@dataclass
class BuiltResults:
    """The results of one breast's images, built and staged, not yet stored."""

    objects: dict[int, list[StagedResult]]  # id(ImageAnalysis) -> its objects, in order
    left_out: list[tuple[str, str]]  # (SOP Instance UID, reason): results not buildable
    seconds: float

    def discard_unstored(self, store: Store) -> None:
        for staged in (x for objects in self.objects.values() for x in objects):
            if not staged.stored:
                store.discard_staged(staged.file)


class ResultThreads:
    """Stage 4 beside stage 3: each breast's images handed over by `submit` are built on
    `threads` background threads (in submission order with one) while the worker analyses
    the next breast; with 0 they are built when `collect` is called. `collect` waits for
    all and re-raises what a build raised. Use as a context manager: leaving it on an
    error waits for the builds already started, drops the others and discards what the
    finished ones staged (a job that failed while analysing stores nothing)."""

    def __init__(self, build: Callable[[Sequence[ImageAnalysis]], BuiltResults],
                 threads: int, discard: Callable[[BuiltResults], None]) -> None:
        self._build = build
        self._discard = discard
        self._pool = (ThreadPoolExecutor(max_workers=threads, thread_name_prefix="results")
                      if threads > 0 else None)
        self._pending: list[Future | Sequence[ImageAnalysis]] = []

    def submit(self, analyses: Sequence[ImageAnalysis]) -> None:
        self._pending.append(self._pool.submit(self._build, analyses) if self._pool
                             else analyses)

    def collect(self) -> list[BuiltResults]:
        built: list[BuiltResults] = []
        try:
            for pending in self._pending:
                built.append(pending.result() if isinstance(pending, Future)
                             else self._build(pending))
        except BaseException:
            for part in built:
                self._discard(part)
            raise
        return built

    def __enter__(self) -> ResultThreads:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if exc_type is not None:
            for pending in self._pending:
                if (isinstance(pending, Future) and not pending.cancelled()
                        and pending.exception() is None):
                    self._discard(pending.result())


class Worker:
    def __init__(self, config: Config, store: Store, *, models: ModelRegistry | None = None,
                 name: str | None = None,
                 result_builder: ImageResultBuilder | None = None,
                 study_result_builder: StudyResultBuilder | None = None) -> None:
        from dicomnode.network.scu import Deliverer
        from dicomnode.wiring import destinations_from_config

        self.config = config
        self.store = store
        self.models = models or ModelRegistry(config.model)
        self.id = name or worker_id()
        self.destinations = destinations_from_config(config)
        self.deliverer = Deliverer(store, config.node.ae_title, self.destinations, self.id)
        self._build: ImageResultBuilder = result_builder or _default_result_builder(config)
        self._build_study: StudyResultBuilder = (study_result_builder
                                                 or _default_study_result_builder(config))
        self.retention = RetentionSchedule(config, store)
        self._stop = threading.Event()
        self.jobs_done = 0
        self.jobs_failed = 0
        self.last_times: StageTimes | None = None

    def stop(self) -> None:
        self._stop.set()

    def reclaim_from_dead_workers(self) -> tuple[int, int]:
        """At start: the jobs and deliveries leased by this machine's workers that are gone
        (this node before it was killed) are due now, not when their leases run out; a
        delivery cut off mid-send resumes at once. (jobs, deliveries) released."""
        dead = dead_workers(self.store.lease_owners())
        if not dead:
            return 0, 0
        jobs, deliveries = self.store.expire_leases(dead)
        log.warning("event=leases_reclaimed %s", kv(worker=self.id, jobs=jobs,
                                                     deliveries=deliveries,
                                                     owners=",".join(sorted(dead))))
        return jobs, deliveries

    def run_forever(self) -> None:
        log.info("event=worker_started %s", kv(worker=self.id))
        try:
            self.reclaim_from_dead_workers()
        except Exception:  # the leases run out in the end anyway
            log.exception("event=reclaim_failed %s", kv(worker=self.id))
        idle_by_ae = {p.ae_title: p.idle_seconds for p in self.config.peers
                      if p.idle_seconds is not None}
        while not self._stop.is_set():
            worked = False
            try:
                self.retention.run_due()   # [storage] retention_days, when due
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
            from storage import utcnow

            waited = (utcnow() - job.queued_at).total_seconds()
            prometheus.JOB_STAGE_SECONDS.observe(max(0.0, waited), stage="wait")
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
        from storage import LeaseLost

        try:
            self.store.complete_job(job.id, self.id)
        except LeaseLost:
            log.warning("event=lease_lost %s", kv(job=job.id, study_uid=job.study_uid))
            return True
        self.jobs_done += 1
        self.last_times = times
        total = time.perf_counter() - started
        prometheus.JOBS.inc(outcome="done")
        for stage, seconds in (("load", times.load), ("model", times.model),
                               ("results", times.results), ("total", total)):
            prometheus.JOB_STAGE_SECONDS.observe(seconds, stage=stage)
        log.info("event=job_done %s", kv(
            job=job.id, study_uid=job.study_uid, images=times.images,
            load_s=round(times.load, 2), model_s=round(times.model, 2),
            results_s=round(times.results, 2), building_s=round(times.building, 2),
            total_s=round(total, 2), skipped=len(times.skipped)))
        return True

    def _fail(self, job: Job, error: str, *, retry: bool) -> None:
        from storage import LeaseLost

        self.jobs_failed += 1
        prometheus.JOBS.inc(outcome="retry" if retry else "failed")
        log.error("event=job_failed %s", kv(job=job.id, study_uid=job.study_uid, retry=retry,
                                            error=error))
        try:
            self.store.fail_job(job.id, self.id, error, retry=retry)
        except LeaseLost:
            pass

    def _renew(self, job: Job) -> None:
        self.store.renew_lease(job.id, self.id, lease_seconds=self.config.worker.lease_seconds)

    def process(self, job: Job) -> StageTimes:
        """The job's stages, in order (see the module's docstring); the seconds each took."""
        times = StageTimes()
        headers = self.find_images(job, times)
        models = self.select_models(job, headers)
        with ResultThreads(self.build_image_results, self.config.worker.result_threads,
                           discard=lambda part: part.discard_unstored(self.store)) as builders:
            analyses = self.analyse_images(job, headers, models, times,
                                           on_breast=builders.submit)
            t0 = time.perf_counter()
            built = builders.collect()
        try:
            produced = self.queue_results(job, analyses, built, times)
        finally:  # what a failure left unstored
            for part in built:
                part.discard_unstored(self.store)
        self._supersede(job, produced)
        times.results = time.perf_counter() - t0
        times.building += sum(part.seconds for part in built)
        return times

    def find_images(self, job: Job, times: StageTimes) -> list[ImageHeader]:
        """Stage 1: the headers of the study's usable breast images; the others are left
        out (recorded in ``times.skipped`` and the audit trail). JobFailed when none is."""
        paths = [i.path for i in self.store.study_instances(job.study_uid)]
        headers, times.skipped = usable_headers(paths)
        for problem in times.skipped:
            self._left_out(job, times, None, problem)
        if not headers:
            raise JobFailed(f"study {job.study_uid} has no usable breast image"
                            + (f": {times.skipped[0]}" if times.skipped else ""))
        return headers

    def select_models(self, job: Job, headers: Sequence[ImageHeader]) -> dict[str, LoadedModel]:
        """Stage 2: the loaded model of each modality the study holds. Fails early and
        clearly (JobFailed) when no modality of the study has one; a modality without one
        is logged and its images skipped."""
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
                prometheus.MODELS_LOADED.set(1, modality=modality, device=str(loaded.device))
        if not models:
            raise JobFailed("; ".join(unavailable) or
                            f"study {job.study_uid}: every modality it holds is switched off "
                            "in [model]")
        for problem in unavailable:
            log.warning("event=modality_skipped %s", kv(job=job.id, reason=problem))
        return models

    def analyse_images(self, job: Job, headers: Sequence[ImageHeader],
                       models: dict[str, LoadedModel], times: StageTimes, *,
                       on_breast: Callable[[list[ImageAnalysis]], None] | None = None
                       ) -> list[ImageAnalysis]:
        """Stage 3: each image with a model loaded (pixels) and analysed, one at a time (a
        DBT is large), one breast after the other; an image that cannot be read is left
        out. Each breast's analyses go to `on_breast` as soon as its last image is done
        (all at the end when a header does not name its breast). The analyses come back in
        the headers' order. JobFailed when none could be."""
        todo = [i for i, h in enumerate(headers) if h.modality in models]
        by_breast = all(headers[i].laterality for i in todo)

        def breast_of(i: int) -> str | None:
            return headers[i].laterality if by_breast else None

        todo.sort(key=lambda i: (breast_of(i) or "", i))  # a breast's images together
        done: dict[int, ImageAnalysis] = {}
        breast: list[ImageAnalysis] = []
        for n, i in enumerate(todo):
            analysis = self._analyse(job, headers[i], models[headers[i].modality], times)
            if analysis is not None:
                done[i] = analysis
                breast.append(analysis)
            last_of_breast = n + 1 == len(todo) or breast_of(todo[n + 1]) != breast_of(i)
            if last_of_breast and breast:
                if on_breast is not None:
                    on_breast(breast)
                breast = []
        if not done:
            raise JobFailed(f"study {job.study_uid}: no image could be read: {times.skipped[0]}")
        return [done[i] for i in sorted(done)]

    def _analyse(self, job: Job, header: ImageHeader, loaded: LoadedModel,
                 times: StageTimes) -> ImageAnalysis | None:
        """One image read and analysed; None (left out) when its pixels cannot be read. The
        decoded pixels are released afterwards: results need only the image's geometry."""
        t0 = time.perf_counter()
        try:
            image = read_pixels(header)
        except UnusableImageError as exc:
            self._left_out(job, times, header.sop_instance_uids[0], str(exc))
            return None
        t1 = time.perf_counter()
        analysis = analyse_image(image, loaded)
        image.release_pixels()
        t2 = time.perf_counter()
        times.load += t1 - t0
        times.model += t2 - t1
        times.images += 1
        prometheus.MODEL_SECONDS.inc(t2 - t1, modality=image.modality)
        prometheus.IMAGES_ANALYSED.inc(modality=image.modality)
        log.info("event=image_analysed %s", kv(
            job=job.id, sop_instance_uid=image.sop_instance_uids[0], modality=image.modality,
            laterality=image.laterality, view=image.view,
            malignant=round(analysis.final.malignant, 4),
            benign=round(analysis.final.benign, 4), model_s=round(t2 - t1, 2)))
        self._renew(job)
        return analysis

    def build_image_results(self, analyses: Sequence[ImageAnalysis]) -> BuiltResults:
        """Stage 4: the result objects of one breast's images, built, encoded and staged
        (written, not yet stored: Store.stage_result), the expensive part of results. It
        runs on a results thread: it touches neither the job nor the database. An image
        whose results cannot be built (highdicom refuses its geometry, say) is left out;
        the others keep theirs."""
        from dicomnode.results.common import ResultsError

        t0 = time.perf_counter()
        breasts = combine_breasts(list(analyses))
        built = BuiltResults({}, [], 0.0)
        try:
            for analysis in analyses:
                try:
                    datasets = self._build(analysis, breasts.get(analysis.image.laterality))
                except ResultsError as exc:
                    built.left_out.append((analysis.image.sop_instance_uids[0], str(exc)))
                    continue
                staged = built.objects[id(analysis)] = []
                while datasets:  # a full-size map is 1 GB: each gone once it is on disk
                    dataset, kind = datasets.pop(0)
                    staged.append(StagedResult.write(self.store, dataset, kind,
                                                     self.config.results.deflate_level))
                    del dataset
                if analysis.image.modality != "dbt":  # the CAD SR marks DBT regions from it
                    analysis.saliency = analysis.saliency[:0]  # free memory on large studies
        except BaseException:
            built.discard_unstored(self.store)
            raise
        built.seconds = time.perf_counter() - t0
        return built

    def queue_results(self, job: Job, analyses: list[ImageAnalysis],
                      built: Sequence[BuiltResults], times: StageTimes) -> list[str]:
        """Stage 5: the built objects archived and their deliveries queued, image by image
        in the study's order; then the study's (the CAD SR, naming the images left out).
        The SOP Instance UIDs of this run's results. JobFailed when no image's results
        could be built."""
        objects = {key: value for part in built for key, value in part.objects.items()}
        for part in built:
            for sop_instance_uid, reason in part.left_out:
                self._left_out(job, times, sop_instance_uid, reason)
        with_results = [a for a in analyses if id(a) in objects]
        if not with_results:
            raise JobFailed(f"study {job.study_uid}: no image's results could be built: "
                            f"{times.skipped[-1]}")
        destinations = self._destinations_for(job)
        produced: list[str] = []  # SOP Instance UIDs of this run's results
        for analysis in with_results:
            for result in objects[id(analysis)]:
                produced.append(self._archive_and_queue(job, result, destinations))
            self._renew(job)
        # the study's CAD SR, which names the images left out
        t0 = time.perf_counter()
        for dataset, kind in self._build_study(job, with_results, list(times.skipped)):
            study_result = StagedResult.write(self.store, dataset, kind,
                                              self.config.results.deflate_level)
            try:
                produced.append(self._archive_and_queue(job, study_result, destinations))
            finally:
                if not study_result.stored:
                    self.store.discard_staged(study_result.file)
        times.building += time.perf_counter() - t0
        return produced

    def _supersede(self, job: Job, produced: list[str]) -> None:
        """Results once per study: what an earlier run of the study sent and this run did
        not produce again (its study-level objects, made from fewer images; the results of
        an image since replaced or left out) is superseded. Deliveries not yet started are
        cancelled; where one may have arrived, an IHE IOCM rejection note ("Rejected for
        Quality Reasons") follows to the same destinations, so the PACS hides it."""
        stale = self.store.stale_results(job.study_uid, produced)
        if not stale:
            return
        ids = [s.result.id for s in stale]
        note_id = None
        if any(s.reached for s in stale):
            note_id = self._store_rejection(job, stale)
        reached = self.store.supersede_results(ids, rejection_id=note_id)
        if reached and note_id is None:  # one went out while this ran: reject it too
            note_id = self._store_rejection(job, stale)
            if note_id is not None:
                reached = self.store.supersede_results(ids, rejection_id=note_id)
        log.info("event=results_superseded %s", kv(
            job=job.id, study_uid=job.study_uid, superseded=len(ids),
            rejection_sent_to=",".join(reached) or "none"))

    def _store_rejection(self, job: Job, stale) -> int | None:
        """The rejection note of the stale results, archived; None (logged) when it cannot be
        built: the results are still superseded and their unsent deliveries cancelled."""
        import io

        from pydicom import dcmread, dcmwrite

        from dicomnode.results.common import ResultsError
        from dicomnode.results.rejection import build_rejection_note
        from storage import REJECTION

        try:
            headers = [dcmread(s.result.path, stop_before_pixels=True) for s in stale]
            note = build_rejection_note(headers)
        except (OSError, ResultsError) as exc:
            log.error("event=rejection_note_failed %s", kv(job=job.id, study_uid=job.study_uid,
                                                            error=exc))
            return None
        buffer = io.BytesIO()
        dcmwrite(buffer, note, enforce_file_format=True)
        record = self.store.store_result(
            encoded=buffer.getvalue(), sop_instance_uid=str(note.SOPInstanceUID),
            sop_class_uid=str(note.SOPClassUID), study_uid=str(note.StudyInstanceUID),
            series_uid=str(note.SeriesInstanceUID),
            transfer_syntax=str(note.file_meta.TransferSyntaxUID), kind=REJECTION,
            job_id=job.id)
        return record.id

    def _left_out(self, job: Job, times: StageTimes, sop_instance_uid: str | None,
                  reason: str) -> None:
        """An image of the study that gets no results: logged, and kept in the audit trail
        with the reason (`dicomnode status --audit N --json` shows it)."""
        if reason not in times.skipped:
            times.skipped.append(reason)
        log.warning("event=image_left_out %s", kv(job=job.id, study_uid=job.study_uid,
                                                   sop_instance_uid=sop_instance_uid,
                                                   reason=reason))
        try:
            self.store.audit("image_left_out", study_uid=job.study_uid,
                             sop_instance_uid=sop_instance_uid, status="no results",
                             detail=reason)
        except Exception:  # the audit trail must never fail the job
            log.exception("event=audit_failed %s", kv(job=job.id))

    def _destinations_for(self, job: Job) -> list[str]:
        """Back to the calling AE when it is a configured peer that takes results; else to
        every peer configured to take them."""
        if job.calling_ae and job.calling_ae in self.destinations:
            return [job.calling_ae]
        return sorted(self.destinations)

    def _archive_and_queue(self, job: Job, result: StagedResult,
                           destinations: list[str]) -> str:
        record = self.store.store_result(
            encoded=result.file, sop_instance_uid=result.sop_instance_uid,
            sop_class_uid=result.sop_class_uid, study_uid=result.study_uid,
            series_uid=result.series_uid, transfer_syntax=result.transfer_syntax,
            kind=result.kind, job_id=job.id)
        result.stored = True  # the staged file is the archive's now
        for destination in destinations:
            self.store.enqueue_delivery(record.id, destination)
        log.info("event=result_stored %s", kv(job=job.id, kind=result.kind,
                                              sop_instance_uid=result.sop_instance_uid,
                                              destinations=",".join(destinations) or "none"))
        return result.sop_instance_uid


def result_options(config: Config) -> ResultOptions:
    from dicomnode.results import ResultOptions

    results = config.results
    return ResultOptions(
        thresholds=(results.benign_operating_point, results.malignant_operating_point),
        seg_type=results.segmentation,  # type: ignore[arg-type] # validate() checked it
        max_array_bytes=results.max_array_mb * 2**20,
        cad_operating_points=tuple(results.cad_operating_points),
        cad_presentation_required=results.cad_presentation_required,
        pmap_classes=results.pmap_classes, pmap_values=results.map_values,  # type: ignore[arg-type]
        deflate=results.deflate, deflate_level=results.deflate_level)


def _default_result_builder(config: Config) -> ImageResultBuilder:
    """(ImageAnalysis, BreastAnalysis | None) -> [(dataset, kind), ...]: the SEG, the
    Parametric Maps and the SR of one image, with the configured operating points."""
    from dicomnode.results import build_results

    options = result_options(config)

    def build(analysis: ImageAnalysis, breast: BreastAnalysis | None) -> list[ResultObject]:
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


def _default_study_result_builder(config: Config) -> StudyResultBuilder:
    """(Job, [ImageAnalysis], left out) -> [(dataset, kind), ...]: the Mammography CAD SR of
    the study's DBT images, when [results] cad_sr is on and the study has DBT; "left out"
    are the reasons the study's other images got no analysis (the CAD SR says "Not all
    algorithms succeeded" and names them). One that cannot be built is logged and left
    out: the per-image results are already queued."""
    from dicomnode.results import ResultsError, identify_result
    from dicomnode.results.cad_sr import build_cad_sr

    options = result_options(config)

    def build(job: Job, analyses: list[ImageAnalysis],
              left_out: Sequence[str] = ()) -> list[ResultObject]:
        dbt = [a for a in analyses if a.image.modality == "dbt"]
        if not config.results.cad_sr or not dbt:
            return []
        try:
            ds = build_cad_sr(dbt, options, breasts=combine_breasts(analyses),
                              left_out=left_out)
            # IHE AIR identification, as on every result (build_results does the others)
            identify_result(ds, dbt[0].algorithm, _source_header(dbt[0]))
        except ResultsError as exc:
            log.error("event=cad_sr_failed %s", kv(job=job.id, study_uid=job.study_uid,
                                                    error=exc))
            return []
        return [(ds, RESULT_KINDS[str(ds.SOPClassUID)])]

    return build
