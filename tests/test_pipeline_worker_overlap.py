"""The worker builds one breast's results while it analyses the other ([worker]
result_threads), archives nothing before every image is analysed, and sends the same
objects either way; the decoded pixels are released once the model has read them."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread

import dicomnode.pipeline.worker as worker_module
from dicomnode.config import Config
from dicomnode.network.scp import ReceiverPolicy, archive_instance
from dicomnode.pipeline.worker import Worker
from storage import Store
from tests.support.peers import make_checkpoint
from tests.support.synth import SMALL


@pytest.fixture(scope="module")
def study(synth_study) -> Path:
    return next(p for p in synth_study(**SMALL).iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "dbt.pt", "dbt", seed=3)


@contextmanager
def job_run(tmp_path: Path, study: Path, checkpoint: Path, threads: int,
            ) -> Iterator[tuple[Store, str, Worker]]:
    """The study's DBT views through a worker (the other modalities off): its store (closed
    on leaving), the study's UID and the worker."""
    config = Config()
    config.node.data_dir = str(tmp_path / "data")
    config.model.device = "cpu"
    config.model.dbt = str(checkpoint)
    config.model.ffdm = config.model.s2d = "off"
    config.worker.result_threads = threads
    store = Store(config.database_url, tmp_path / "archive")
    policy = ReceiverPolicy("DICOMNODE", patient_key_salt=b"t")
    study_uid = ""
    for path in sorted(study.glob("dbt/*.dcm")):
        _, ds = archive_instance(store, path.read_bytes(), policy, calling_ae="PACS")
        study_uid = str(ds.StudyInstanceUID)
    try:
        store.force_ready(study_uid)
        worker = Worker(config, store, name="w1")
        assert worker.run_one_job()
        yield store, study_uid, worker
    finally:
        store.close()


class Recorder:
    """What happened, in order: ("analysed", laterality) after each image's model pass,
    ("build", laterality, thread, pixels released) as each image's results are built. The
    right breast's model pass waits (bounded) until the left breast's build began, where
    `wait_for_left` says so: with a results thread that build cannot come after it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, wait_for_left: bool,
                 fail_on: str | None = None) -> None:
        self.events: list[tuple] = []
        self.left_building = threading.Event()
        real_analyse = worker_module.analyse_image

        def analyse(image, loaded, **kwargs):
            if image.laterality == fail_on:
                raise RuntimeError("model failed on the right breast")
            if image.laterality == "R" and wait_for_left:
                assert self.left_building.wait(timeout=120)
            analysis = real_analyse(image, loaded, **kwargs)
            self.events.append(("analysed", image.laterality))
            return analysis

        monkeypatch.setattr(worker_module, "analyse_image", analyse)
        real_build = worker_module._default_result_builder

        def result_builder(config):
            build = real_build(config)

            def recorded(analysis, breast):
                image = analysis.image
                self.events.append(("build", image.laterality,
                                    threading.current_thread().name,
                                    image.pixels.strides == (0, 0, 0)))
                if image.laterality == "L":
                    self.left_building.set()
                return build(analysis, breast)
            return recorded

        monkeypatch.setattr(worker_module, "_default_result_builder", result_builder)


@pytest.mark.slow
def test_left_breast_built_on_the_results_thread_while_the_right_is_analysed(
        tmp_path: Path, study: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch, wait_for_left=True)
    with job_run(tmp_path, study, checkpoint, threads=1) as (store, study_uid, worker):
        job = store.list_jobs()[0]
        assert str(job.state) == "done", job.last_error
        events = recorder.events
        builds = [e for e in events if e[0] == "build"]
        assert len(builds) == 4 and all(e[2].startswith("results") for e in builds)
        assert all(e[3] for e in builds), "the decoded pixels were kept after the model"
        first_left_build = events.index(next(e for e in builds if e[1] == "L"))
        right_analysed = [k for k, e in enumerate(events) if e == ("analysed", "R")]
        assert len(right_analysed) == 2 and first_left_build < right_analysed[0]
        kinds = sorted(r.kind for r in store.study_results(study_uid))
        assert kinds == ["cad-sr", *["pmap"] * 4, *["seg"] * 4, *["sr"] * 4]
        times = worker.last_times
        assert times is not None and times.building > 0 and times.results > 0


@pytest.mark.slow
def test_without_results_threads_everything_is_built_after_the_last_image(
        tmp_path: Path, study: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch, wait_for_left=False)
    with job_run(tmp_path, study, checkpoint, threads=0) as (store, _, _):
        assert str(store.list_jobs()[0].state) == "done"
        events = recorder.events
        builds = [k for k, e in enumerate(events) if e[0] == "build"]
        analysed = [k for k, e in enumerate(events) if e[0] == "analysed"]
        assert len(builds) == 4 and min(builds) > max(analysed)
        assert all(events[k][2] == threading.current_thread().name for k in builds)


@pytest.mark.slow
def test_a_job_failing_on_the_right_breast_archives_nothing_of_the_left(
        tmp_path: Path, study: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(monkeypatch, wait_for_left=False, fail_on="R")
    with job_run(tmp_path, study, checkpoint, threads=1) as (store, study_uid, _):
        job = store.list_jobs()[0]
        assert str(job.state) == "queued" and "model failed" in (job.last_error or "")
        # the left breast was built (on the results thread) and then dropped
        assert [e[1] for e in recorder.events if e[0] == "build"] == ["L", "L"]
        assert store.study_results(study_uid) == [] and store.list_deliveries() == []
        assert not [t for t in threading.enumerate() if t.name.startswith("results")]
        # what the left breast's build staged in the archive's temporary area is gone
        assert list((tmp_path / "archive" / ".tmp").iterdir()) == []


@pytest.mark.slow
def test_a_build_failing_mid_breast_stores_nothing_and_leaves_no_staged_file(
        tmp_path: Path, study: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = worker_module._default_result_builder
    calls = []

    def result_builder(config):
        build = real_build(config)

        def failing_on_the_second(analysis, breast):
            calls.append(analysis.image.laterality)
            if len(calls) == 2:  # the first image's objects are staged by now
                raise RuntimeError("disk trouble while building")
            return build(analysis, breast)
        return failing_on_the_second

    monkeypatch.setattr(worker_module, "_default_result_builder", result_builder)
    with job_run(tmp_path, study, checkpoint, threads=1) as (store, study_uid, _):
        job = store.list_jobs()[0]
        assert str(job.state) == "queued" and "disk trouble" in (job.last_error or "")
        assert calls[:2] == ["L", "L"]
        assert store.study_results(study_uid) == [] and store.list_deliveries() == []
        assert list((tmp_path / "archive" / ".tmp").iterdir()) == []


def timeless(encoded: bytes) -> list[tuple]:
    """Every element of a Part 10 file but its dates and times (a run's own clock), pixel
    data included, in order."""
    ds = dcmread(io.BytesIO(encoded))
    return [(e.tag, e.VR, e.value) for e in ds.iterall() if e.VR not in ("DA", "TM", "DT", "SQ")]


@pytest.mark.slow
def test_results_threads_change_nothing_that_is_sent(tmp_path: Path, study: Path,
                                                     checkpoint: Path) -> None:
    sent: dict[int, dict[str, list[tuple]]] = {}
    for threads in (0, 1):
        run = tmp_path / str(threads)
        with job_run(run, study, checkpoint, threads) as (store, study_uid, _):
            sent[threads] = {r.sop_instance_uid: timeless(Path(r.path).read_bytes())
                             for r in store.study_results(study_uid)}
            # every staged file was taken into the archive
            assert list((run / "archive" / ".tmp").iterdir()) == []
    assert len(sent[1]) == 13 and sent[0].keys() == sent[1].keys()
    differ = [uid for uid in sent[0] if sent[0][uid] != sent[1][uid]]
    first_difference = [  # of each object that differs: what to look at
        next(((a, b) for a, b in zip(sent[0][u], sent[1][u], strict=False) if a != b),
             "element counts differ") for u in differ]
    assert not differ, first_difference
