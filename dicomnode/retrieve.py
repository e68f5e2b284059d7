"""Pull studies for training from a PACS into the archive: C-FIND, then C-GET or C-MOVE.

The studies are named by a CSV of study UIDs and/or accession numbers (a training labels
file will do). Each is resolved by a study-level C-FIND, its instances listed by series- and
image-level C-FINDs, and fetched only if the archive lacks some of them: a run that stops
part way is simply run again. Every study ends in one outcome (:class:`StudyOutcome`); the
caller lists those that are missing or incomplete, never skipping one silently.

Retrieved studies are archived for training, not for inference: their job is cancelled so
the worker does not analyse them and send results to the PACS (`dicomnode jobs retry` would).
"""

from __future__ import annotations

import csv
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.errors import ConfigError, DicomnodeError
from dicomnode.logs import kv

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from dicomnode.config import Config, PeerConfig
    from dicomnode.scp import ReceiverPolicy
    from storage import Store

log = logging.getLogger("dicomnode.retrieve")

PENDING = (0xFF00, 0xFF01)
STUDY_KEYS = ("study_uid", "study_instance_uid", "StudyInstanceUID")
ACCESSION_KEYS = ("accession_number", "accession", "AccessionNumber")


class RetrieveError(DicomnodeError):
    """The retrieve cannot run as asked (bad list, no such peer, PACS unreachable)."""


@dataclass(frozen=True)
class StudyKey:
    """One study the list asks for: by Study Instance UID or by Accession Number."""

    study_uid: str = ""
    accession_number: str = ""
    line: int = 0

    @property
    def text(self) -> str:
        return self.study_uid or f"accession {self.accession_number}"

    @property
    def identity(self) -> tuple[str, str]:
        """What makes two rows name the same study: the UID, else the accession number."""
        return (self.study_uid, "" if self.study_uid else self.accession_number)


@dataclass
class StudyOutcome:
    key: StudyKey
    # complete: already all in the archive; retrieved: fetched now, complete; missing: the
    # PACS does not hold it; incomplete: some instances did not arrive; error: C-FIND/GET/MOVE
    # failed (PACS down, refused).
    status: str
    study_uid: str = ""
    wanted: int = 0        # instances the PACS lists that the node archives
    archived: int = 0      # of those, in the archive now
    fetched: int = 0       # received by this run
    detail: str = ""


@dataclass
class RetrieveReport:
    outcomes: list[StudyOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def problems(self) -> list[StudyOutcome]:
        return [o for o in self.outcomes if o.status in ("missing", "incomplete", "error")]

    def summary(self) -> str:
        """"retrieved=n complete=n missing=n incomplete=n error=n" (parsed by status)."""
        return " ".join(f"{s}={self.count(s)}"
                        for s in ("retrieved", "complete", "missing", "incomplete", "error"))

    def write_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["line", "study_uid", "accession_number", "status", "wanted",
                             "archived", "fetched", "detail"])
            for o in self.outcomes:
                writer.writerow([o.key.line, o.study_uid or o.key.study_uid,
                                 o.key.accession_number, o.status, o.wanted, o.archived,
                                 o.fetched, o.detail])


def read_study_keys(path: str | Path) -> list[StudyKey]:
    """The studies a CSV names (columns study_uid and/or accession_number; other columns,
    e.g. a training labels file's, are ignored), each once, in file order."""
    path = Path(path)
    if not path.is_file():
        raise RetrieveError(f"labels file {path} does not exist; pass a CSV with a study_uid "
                            "or accession_number column")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise RetrieveError(f"{path}: not a readable CSV file ({exc})") from None
    study_col = next((c for c in STUDY_KEYS if c in columns), None)
    accession_col = next((c for c in ACCESSION_KEYS if c in columns), None)
    if study_col is None and accession_col is None:
        raise RetrieveError(f"{path}: no study_uid or accession_number column (the header has "
                            f"{', '.join(columns) or 'no columns'}); name the studies by one")
    keys: list[StudyKey] = []
    seen: set[tuple[str, str]] = set()
    for n, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()
               if not isinstance(v, list)}
        study = row.get(study_col or "", "")
        accession = row.get(accession_col or "", "")
        if not study and not accession:
            raise RetrieveError(f"{path} line {n}: neither a study UID nor an accession "
                                "number; fill one in or remove the row")
        key = StudyKey(study, accession, n)
        if key.identity not in seen:
            seen.add(key.identity)
            keys.append(key)
    return keys


def write_complete_labels(source: str | Path, report: RetrieveReport,
                          out: str | Path) -> int:
    """The rows of ``source`` whose study is complete in the archive now, with the study
    UID filled in (an accession-keyed row gets one row per study it resolved to), for
    `dicomnode train`; how many rows were written."""
    source, out = Path(source), Path(out)
    done: dict[tuple[str, str], list[str]] = {}
    for o in report.outcomes:
        if o.status in ("retrieved", "complete"):
            done.setdefault(o.key.identity, []).append(o.study_uid)
    with source.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = list(reader)
    study_col = next((c for c in STUDY_KEYS if c in columns), None)
    accession_col = next((c for c in ACCESSION_KEYS if c in columns), None)
    fields = columns if study_col == "study_uid" else ["study_uid", *columns]
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for raw in rows:
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()
                   if not isinstance(v, list)}
            study = row.get(study_col or "", "")
            key = StudyKey(study, row.get(accession_col or "", "")).identity
            for study_uid in done.get(key, []):
                writer.writerow({**row, "study_uid": study_uid})
                written += 1
    return written


def retrieve_peer(config: Config, ae_title: str | None) -> PeerConfig:
    """The [[peers]] entry to retrieve from: the one named, else the only one with
    retrieve = true."""
    peers = [p for p in config.peers if p.retrieve]
    if ae_title is not None:
        peers = [p for p in peers if p.ae_title == ae_title]
        if not peers:
            raise ConfigError(f"no [[peers]] entry with ae_title {ae_title!r} and "
                              "retrieve = true; add one or name another with --peer")
    if not peers:
        raise ConfigError("no [[peers]] entry has retrieve = true; mark the PACS to "
                          "retrieve from")
    if len(peers) > 1:
        raise ConfigError("several [[peers]] have retrieve = true ("
                          + ", ".join(p.ae_title for p in peers) + "); choose one with --peer")
    return peers[0]


class Retriever:
    """Resolves and fetches studies from one peer into the store (see module doc)."""

    def __init__(self, store: Store, policy: ReceiverPolicy, peer: PeerConfig,
                 ae_title: str, *, method: str | None = None,
                 timeout_s: float = 120.0) -> None:
        from dicomnode.scp import BREAST_SOP_CLASSES

        self.store = store
        self.policy = policy
        self.peer = peer
        self.ae_title = ae_title
        self.method = method or peer.retrieve_method
        if self.method not in ("get", "move"):
            raise ConfigError(f"retrieve method {self.method!r} is not one of get, move")
        self.timeout_s = timeout_s
        self.breast_classes = set(BREAST_SOP_CLASSES)
        self._received = 0
        self._lock = threading.Lock()

    # -- associations -------------------------------------------------------------------

    def _ae(self, storage_classes: list[str]) -> AE:
        from dicomnode.scp import TRANSFER_SYNTAXES

        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = 15
        ae.network_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.maximum_pdu_size = 0
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        if self.method == "move":
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        elif storage_classes:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            for uid in storage_classes[:126]:  # 128 contexts at most
                ae.add_requested_context(uid, TRANSFER_SYNTAXES)
        return ae

    @contextmanager
    def _association(self, storage_classes: list[str] | None = None
                     ) -> Iterator[Association]:
        """An association for C-FIND and C-MOVE, or (``storage_classes``) for a C-GET whose
        C-STOREs carry those SOP classes, the node in the SCP role for them."""
        classes = sorted(set(storage_classes or []))
        ae = self._ae(classes)
        kwargs: dict = {}
        if classes:
            kwargs["ext_neg"] = [build_role(uid, scp_role=True) for uid in classes[:126]]
            kwargs["evt_handlers"] = [(evt.EVT_C_STORE, self._handle_store)]
        assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.ae_title,
                             **kwargs)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "unreachable or aborted"
            raise RetrieveError(f"association with {self.peer.ae_title} at {self.peer.host}:"
                                f"{self.peer.port} {why}; check the [[peers]] entry and that "
                                "the PACS knows this node's AE title")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _handle_store(self, event: evt.Event) -> int:
        """C-STORE sub-operations of a C-GET: archived as if received."""
        from dicomnode.scp import EncodedInstance, StoreRefused, archive_instance

        encoded = EncodedInstance.from_c_store(event)
        try:
            archive_instance(self.store, encoded, self.policy, calling_ae=self.peer.ae_title,
                             sop_class=str(event.context.abstract_syntax),
                             sop_instance=str(event.request.AffectedSOPInstanceUID or ""))
        except StoreRefused as refused:
            log.warning("event=retrieve_refused %s", kv(
                sop_instance_uid=str(event.request.AffectedSOPInstanceUID or ""),
                status=f"0x{refused.status:04X}", comment=refused.comment))
            return refused.status
        finally:
            encoded.close()
        with self._lock:
            self._received += 1
        return 0x0000

    # -- queries ------------------------------------------------------------------------

    @staticmethod
    def _find(assoc: Association, query: Dataset) -> list[Dataset]:
        out = []
        for status, identifier in assoc.send_c_find(query,
                                                    StudyRootQueryRetrieveInformationModelFind):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in PENDING and identifier is not None:
                out.append(identifier)
            elif code not in (0x0000, *PENDING):
                raise RetrieveError(f"C-FIND failed with status 0x{code & 0xFFFF:04X}"
                                    if code >= 0 else "C-FIND got no response (timeout)")
        return out

    def resolve(self, assoc: Association, key: StudyKey) -> list[str]:
        """Study Instance UIDs the PACS holds for this key (empty: missing)."""
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = key.study_uid or ""
        q.AccessionNumber = "" if key.study_uid else key.accession_number
        found = self._find(assoc, q)
        uids = [str(f.get("StudyInstanceUID", "")) for f in found]
        if key.study_uid:  # a PACS that ignores the key must not widen the match
            uids = [u for u in uids if u == key.study_uid]
        return sorted({u for u in uids if u})

    def remote_instances(self, assoc: Association, study_uid: str
                         ) -> dict[str, tuple[str, str]]:
        """{SOP Instance UID: (Series Instance UID, SOP Class UID)} of the study at the PACS
        (series, then image level: the Study Root's hierarchical query)."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        series = [str(s.SeriesInstanceUID) for s in self._find(assoc, q)
                  if s.get("SeriesInstanceUID")]
        out: dict[str, tuple[str, str]] = {}
        for series_uid in series:
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = series_uid
            q.SOPInstanceUID = ""
            q.SOPClassUID = ""
            for image in self._find(assoc, q):
                if image.get("SOPInstanceUID"):
                    out[str(image.SOPInstanceUID)] = (series_uid,
                                                      str(image.get("SOPClassUID", "")))
        return out

    def _wanted(self, remote: dict[str, tuple[str, str]]) -> set[str]:
        """The instances the node archives (its policy): breast images, or all."""
        if self.policy.other_storage == "store":
            return set(remote)
        return {uid for uid, (_, cls) in remote.items()
                if not cls or cls in self.breast_classes}

    def _archived(self, study_uid: str) -> set[str]:
        from storage.errors import StudyNotFound

        try:
            return {i.sop_instance_uid for i in self.store.study_instances(study_uid)}
        except StudyNotFound:
            return set()

    # -- fetching -----------------------------------------------------------------------

    def _fetch(self, assoc: Association, study_uid: str,
               missing: dict[str, tuple[str, str]]) -> str:
        """C-GET or C-MOVE the missing instances (image level, a UID list per series: the
        PACS sends nothing the node would refuse, and nothing it already has); "" or what
        went wrong."""
        by_series: dict[str, list[str]] = {}
        for sop_uid, (series_uid, _) in sorted(missing.items()):
            by_series.setdefault(series_uid, []).append(sop_uid)
        problems = []
        for series_uid, sop_uids in sorted(by_series.items()):
            for i in range(0, len(sop_uids), 100):
                q = Dataset()
                q.QueryRetrieveLevel = "IMAGE"
                q.StudyInstanceUID = study_uid
                q.SeriesInstanceUID = series_uid
                q.SOPInstanceUID = sop_uids[i:i + 100]
                problem = self._send(assoc, q)
                if problem:
                    problems.append(problem)
                if not assoc.is_established:
                    return problem or "the association ended"
        return "; ".join(sorted(set(problems)))

    def _send(self, assoc: Association, q: Dataset) -> str:
        if self.method == "get":
            responses = assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)
        else:
            responses = assoc.send_c_move(q, self.ae_title,
                                          StudyRootQueryRetrieveInformationModelMove)
        final = None
        for status, _ in responses:
            if status is None or not status:
                return "no response (timeout or association ended)"
            final = status
        code = int(getattr(final, "Status", -1)) if final is not None else -1
        if code in (0x0000, 0xB000):
            failed = int(getattr(final, "NumberOfFailedSuboperations", 0) or 0)
            return f"{failed} sub-operations failed" if failed else ""
        if code == 0xA801:
            return (f"0xA801 move destination unknown: the PACS does not know AE "
                    f"{self.ae_title}; add the node to its modalities")
        return f"status 0x{code & 0xFFFF:04X}" if code >= 0 else "no final response"

    def retrieve(self, keys: list[StudyKey],
                 progress: Callable[[int, int, StudyOutcome], None] | None = None
                 ) -> RetrieveReport:
        """Each key in order; ``progress(i, n, outcome)`` after each study."""
        report = RetrieveReport()
        with self._association() as assoc:
            for n, key in enumerate(keys, start=1):
                for outcome in self._one(assoc, key):
                    report.outcomes.append(outcome)
                    self._after(outcome)
                    if progress is not None:
                        progress(n, len(keys), outcome)
                if not assoc.is_established:
                    raise RetrieveError(f"the association with {self.peer.ae_title} ended "
                                        f"during {key.text}; run again to resume")
        return report

    def _one(self, assoc: Association, key: StudyKey) -> list[StudyOutcome]:
        try:
            uids = self.resolve(assoc, key)
        except RetrieveError as exc:
            return [StudyOutcome(key, "error", key.study_uid, detail=str(exc))]
        if not uids:
            return [StudyOutcome(key, "missing", key.study_uid,
                                 detail=f"{self.peer.ae_title} does not hold it")]
        outcomes = []
        for study_uid in uids:
            try:
                remote = self.remote_instances(assoc, study_uid)
            except RetrieveError as exc:
                outcomes.append(StudyOutcome(key, "error", study_uid, detail=str(exc)))
                continue
            wanted = self._wanted(remote)
            have = self._archived(study_uid) & wanted
            if wanted and have == wanted:
                outcomes.append(StudyOutcome(key, "complete", study_uid, len(wanted),
                                             len(have)))
                continue
            before = len(have)
            with self._lock:
                self._received = 0
            missing = {u: remote[u] for u in wanted - have}
            if self.method == "get":
                # Its own association, proposing exactly the classes the C-STOREs will carry
                # (a class not negotiated makes a PACS fail the whole C-GET).
                try:
                    with self._association([cls for _, cls in missing.values() if cls]
                                           ) as get_assoc:
                        problem = self._fetch(get_assoc, study_uid, missing)
                except RetrieveError as exc:
                    problem = str(exc)
            else:
                problem = self._fetch(assoc, study_uid, missing)
            have = self._archived(study_uid) & wanted
            with self._lock:
                fetched = self._received if self.method == "get" else len(have) - before
            ok = bool(wanted) and have == wanted
            detail = problem if problem else ("" if ok else
                                              f"{len(wanted) - len(have)} instances missing")
            if not wanted:
                detail = "the PACS lists no instances of a class this node archives"
            outcomes.append(StudyOutcome(key, "retrieved" if ok else "incomplete", study_uid,
                                         len(wanted), len(have), fetched, detail))
        return outcomes

    def _after(self, outcome: StudyOutcome) -> None:
        """Audit the study; keep a fetched study out of inference."""
        from storage.errors import InvalidState

        if outcome.status in ("retrieved", "incomplete") and outcome.study_uid:
            job_id = self.store.study_job_id(outcome.study_uid)
            if job_id is not None:
                try:
                    self.store.cancel_job(job_id)
                except InvalidState:
                    pass  # already done or cancelled: nothing will run
        self.store.audit("retrieve_study", called_ae=self.peer.ae_title[:16],
                         peer=f"{self.peer.host}:{self.peer.port}",
                         study_uid=outcome.study_uid or None, count=outcome.archived,
                         status=outcome.status, detail=outcome.detail or None)
        log.info("event=retrieve_study %s", kv(
            study_uid=outcome.study_uid, status=outcome.status, wanted=outcome.wanted,
            archived=outcome.archived, method=self.method))
