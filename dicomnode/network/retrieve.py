"""Pull studies for training from a PACS into the archive: C-FIND, then C-GET or C-MOVE;
or, from a DICOMweb peer, QIDO-RS then WADO-RS.

The studies are named by a CSV of study UIDs and/or accession numbers (a training labels
file will do). Each is resolved by a study-level query, its instances listed (series- and
image-level C-FINDs, or QIDO-RS of the study's instances), and fetched only if the archive
lacks some of them: a run that stops part way is simply run again. The two ways are two
:class:`Transport` implementations under one :class:`Retriever`. Every study ends in one
outcome (:class:`StudyOutcome`); the caller lists those that are missing or
incomplete, never skipping one silently.

Retrieved studies are archived for training, not for inference: their job is cancelled so
the worker does not analyse them and send results to the PACS (`dicomnode jobs retry` would).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.errors import ConfigError, DicomnodeError
from dicomnode.ops.logs import kv

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from dicomnode.config import Config, PeerConfig
    from dicomnode.network.scp import ReceiverPolicy
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


METHODS = ("get", "move", "wado")
METHOD_NAMES = {"get": "C-GET", "move": "C-MOVE", "wado": "WADO-RS"}


def retrieve_method(peer: PeerConfig, method: str | None = None) -> str:
    """How to retrieve from ``peer``: ``method`` if given, else its retrieve_method, else
    (automatic) WADO-RS where it has a dicomweb_url, C-GET otherwise."""
    chosen = method or peer.retrieve_method or ("wado" if peer.dicomweb_url else "get")
    if chosen not in METHODS:
        raise ConfigError(f"retrieve method {chosen!r} is not one of {', '.join(METHODS)}")
    if chosen == "wado" and not peer.dicomweb_url:
        raise ConfigError(f"peer {peer.ae_title} has no dicomweb_url: WADO-RS needs the "
                          "peer's DICOMweb base URL (e.g. https://pacs/dicom-web)")
    return chosen


class Transport:
    """How studies are found and fetched from the peer: C-FIND then C-GET/C-MOVE
    (:class:`DimseTransport`) or QIDO-RS then WADO-RS (:class:`WadoTransport`). The
    :class:`Retriever` decides what is wanted and missing; a transport lists and fetches."""

    name = ""

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Open (and at the end close) what the queries and fetches share."""
        raise NotImplementedError

    @property
    def lost(self) -> str:
        """Why the peer can no longer be reached during the session ("" while it can)."""
        raise NotImplementedError

    def resolve(self, key: StudyKey) -> list[str]:
        """Study Instance UIDs the peer holds for this key (empty: missing)."""
        raise NotImplementedError

    def remote_instances(self, study_uid: str) -> dict[str, tuple[str, str]]:
        """{SOP Instance UID: (Series Instance UID, SOP Class UID)} of the study at the peer."""
        raise NotImplementedError

    def fetch(self, study_uid: str, missing: dict[str, tuple[str, str]],
              remote: dict[str, tuple[str, str]]) -> tuple[str, int | None]:
        """Fetch the missing instances into the archive: what went wrong ("" if nothing) and
        how many arrived (None: count them in the archive)."""
        raise NotImplementedError


class DimseTransport(Transport):
    """C-FIND, then C-GET (on its own association, the node in the SCP role for the
    classes it carries) or C-MOVE (to the node's AE title: its SCP receives)."""

    def __init__(self, retriever: Retriever, method: str) -> None:
        self.r = retriever
        self.method = method
        self.name = METHOD_NAMES[method]
        self._assoc: Association | None = None
        self._received = 0
        self._lock = threading.Lock()

    def _ae(self, storage_classes: list[str]) -> AE:
        from dicomnode.identifiers import RECEIVED_TRANSFER_SYNTAXES

        ae = AE(ae_title=self.r.ae_title)
        ae.acse_timeout = 15
        ae.network_timeout = self.r.timeout_s
        ae.dimse_timeout = self.r.timeout_s
        ae.maximum_pdu_size = 0
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        if self.method == "move":
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        elif storage_classes:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            for uid in storage_classes[:126]:  # 128 contexts at most
                ae.add_requested_context(uid, RECEIVED_TRANSFER_SYNTAXES)
        return ae

    @contextmanager
    def _association(self, storage_classes: list[str] | None = None
                     ) -> Iterator[Association]:
        """An association for C-FIND and C-MOVE, or (``storage_classes``) for a C-GET whose
        C-STOREs carry those SOP classes, the node in the SCP role for them."""
        peer = self.r.peer
        classes = sorted(set(storage_classes or []))
        ae = self._ae(classes)
        kwargs: dict = {}
        if classes:
            kwargs["ext_neg"] = [build_role(uid, scp_role=True) for uid in classes[:126]]
            kwargs["evt_handlers"] = [(evt.EVT_C_STORE, self._handle_store)]
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, **kwargs)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "unreachable or aborted"
            raise RetrieveError(f"association with {peer.ae_title} at {peer.host}:"
                                f"{peer.port} {why}; check the [[peers]] entry and that "
                                "the PACS knows this node's AE title")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    @contextmanager
    def session(self) -> Iterator[None]:
        with self._association() as assoc:
            self._assoc = assoc
            try:
                yield
            finally:
                self._assoc = None

    @property
    def lost(self) -> str:
        if self._assoc is not None and self._assoc.is_established:
            return ""
        return f"the association with {self.r.peer.ae_title} ended"

    def _handle_store(self, event: evt.Event) -> int:
        """C-STORE sub-operations of a C-GET: archived as if received."""
        from dicomnode.network.instance_checks import EncodedInstance, StoreRefused
        from dicomnode.network.scp import archive_instance

        encoded = EncodedInstance.from_c_store(event)
        try:
            archive_instance(self.r.store, encoded, self.r.policy,
                             calling_ae=self.r.peer.ae_title,
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

    def _find(self, query: Dataset) -> list[Dataset]:
        assert self._assoc is not None, "outside session()"
        out = []
        for status, identifier in self._assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in PENDING and identifier is not None:
                out.append(identifier)
            elif code not in (0x0000, *PENDING):
                raise RetrieveError(f"C-FIND failed with status 0x{code & 0xFFFF:04X}"
                                    if code >= 0 else "C-FIND got no response (timeout)")
        return out

    def resolve(self, key: StudyKey) -> list[str]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = key.study_uid or ""
        q.AccessionNumber = "" if key.study_uid else key.accession_number
        return matching_studies(key, [str(f.get("StudyInstanceUID", ""))
                                      for f in self._find(q)])

    def remote_instances(self, study_uid: str) -> dict[str, tuple[str, str]]:
        """Series, then image level: the Study Root's hierarchical query."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        series = [str(s.SeriesInstanceUID) for s in self._find(q) if s.get("SeriesInstanceUID")]
        out: dict[str, tuple[str, str]] = {}
        for series_uid in series:
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = series_uid
            q.SOPInstanceUID = ""
            q.SOPClassUID = ""
            for image in self._find(q):
                if image.get("SOPInstanceUID"):
                    out[str(image.SOPInstanceUID)] = (series_uid,
                                                      str(image.get("SOPClassUID", "")))
        return out

    def fetch(self, study_uid: str, missing: dict[str, tuple[str, str]],
              remote: dict[str, tuple[str, str]]) -> tuple[str, int | None]:
        with self._lock:
            self._received = 0
        if self.method == "move":
            assert self._assoc is not None, "outside session()"
            return self._fetch(self._assoc, study_uid, missing), None
        # Its own association, proposing exactly the classes the C-STOREs will carry (a
        # class not negotiated makes a PACS fail the whole C-GET).
        try:
            with self._association([cls for _, cls in missing.values() if cls]) as get_assoc:
                problem = self._fetch(get_assoc, study_uid, missing)
        except RetrieveError as exc:
            problem = str(exc)
        with self._lock:
            return problem, self._received

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
            responses = assoc.send_c_move(q, self.r.ae_title,
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
                    f"{self.r.ae_title}; add the node to its modalities")
        return f"status 0x{code & 0xFFFF:04X}" if code >= 0 else "no final response"


class WadoTransport(Transport):
    """QIDO-RS (``/studies?AccessionNumber=`` or ``?StudyInstanceUID=``, then
    ``/studies/{study}/instances``), then WADO-RS: a whole series where all of it is
    missing and wanted, else instance by instance. Each part streams to a temporary file in
    ``<data_dir>/retrieve-incoming`` and goes through the SCP's own checks and archive
    function, with the peer's AE title as calling AE, as a C-GET's C-STOREs do."""

    name = "WADO-RS"

    def __init__(self, retriever: Retriever, data_dir: Path) -> None:
        from dicomnode.dicomweb.client import StowTarget

        peer = retriever.peer
        self.r = retriever
        self.target = StowTarget(peer.dicomweb_url, token=peer.token, ca=peer.dicomweb_ca,
                                 cert=peer.dicomweb_cert, key=peer.dicomweb_key,
                                 timeout=retriever.timeout_s)
        self.incoming = Path(data_dir) / INCOMING_DIR
        self._client = None
        self._lost = ""
        self._stored = 0
        self._refused: list[str] = []
        # instances in a syntax the node does not take: SOP UID -> series (first pass), or
        # -> the syntax that came again (transcoded pass)
        self._transcode: dict[str, str] = {}
        self._series: dict[str, str] = {}  # SOP Instance UID -> series, of the study fetched

    @contextmanager
    def session(self) -> Iterator[None]:
        from dicomnode.dicomweb.multipart import sweep_stale_parts
        from dicomnode.dicomweb.wado import DicomwebClient, DicomwebError

        self.incoming.mkdir(parents=True, exist_ok=True)
        sweep_stale_parts(self.incoming)
        try:
            client = DicomwebClient(self.target)
        except DicomwebError as exc:
            raise RetrieveError(f"peer {self.r.peer.ae_title}: {exc}") from None
        self._client, self._lost = client, ""
        try:
            yield
        finally:
            client.close()
            self._client = None

    @property
    def lost(self) -> str:
        return self._lost

    def _call(self, what: Callable[[], object]):
        """Run a request; a DicomwebError becomes a RetrieveError, and one where nothing
        answered, or the credentials were refused, also ends the session (``lost``): every
        other study would fail the same way."""
        from dicomnode.dicomweb.wado import DicomwebError

        try:
            return what()
        except DicomwebError as exc:
            if exc.unreachable:
                self._lost = (f"{self.r.peer.ae_title} at {self.target.url} did not answer "
                              f"({exc})")
            elif exc.status in (401, 403):
                self._lost = f"{self.r.peer.ae_title} refused the credentials ({exc})"
            raise RetrieveError(str(exc)) from None

    def resolve(self, key: StudyKey) -> list[str]:
        from dicomnode.dicomweb.wado import value

        assert self._client is not None, "outside session()"
        params = ({"StudyInstanceUID": key.study_uid} if key.study_uid
                  else {"AccessionNumber": key.accession_number})
        params["includefield"] = "0020000D"
        found = self._call(lambda: self._client.search("/studies", params))
        return matching_studies(key, [value(f, "0020000D") for f in found])

    def remote_instances(self, study_uid: str) -> dict[str, tuple[str, str]]:
        from dicomnode.dicomweb.wado import value

        assert self._client is not None, "outside session()"
        found = self._call(lambda: self._client.search(
            f"/studies/{_quote(study_uid)}/instances",
            {"includefield": "0020000E,00080016,00080018"}))
        out: dict[str, tuple[str, str]] = {}
        for item in found:
            sop = value(item, "00080018")
            if sop:
                out[sop] = (value(item, "0020000E"), value(item, "00080016"))
        return out

    def fetch(self, study_uid: str, missing: dict[str, tuple[str, str]],
              remote: dict[str, tuple[str, str]]) -> tuple[str, int | None]:
        assert self._client is not None, "outside session()"
        self._series = {sop: series for sop, (series, _) in remote.items()}
        in_series: dict[str, set[str]] = {}
        for sop, (series, _) in remote.items():
            in_series.setdefault(series, set()).add(sop)
        requests: list[tuple[str, set[str]]] = []
        for series, sops in sorted(in_series.items()):
            wanted_here = sops & set(missing)
            if not wanted_here:
                continue
            if not series:  # the peer did not say which series: the whole study, once
                requests.append((f"/studies/{_quote(study_uid)}", wanted_here))
                continue
            base = f"/studies/{_quote(study_uid)}/series/{_quote(series)}"
            if wanted_here == sops:
                requests.append((base, sops))
            else:
                requests += [(f"{base}/instances/{_quote(sop)}", {sop})
                             for sop in sorted(wanted_here)]
        self._stored = 0
        self._refused = []
        self._transcode = {}
        problems = self._requests(requests, "*")
        if self._transcode and not problems:
            # Instances stored in a syntax the node does not take: once more each, asking
            # the peer to transcode to Explicit VR Little Endian (as a C-GET would negotiate).
            again = [(self._instance_path(study_uid, series, sop), {sop})
                     for sop, series in sorted(self._transcode.items())]
            self._transcode = {}
            problems = self._requests(again, ExplicitVRLittleEndian)
            problems += [f"transfer syntax {syntax} not accepted, and the peer did not "
                         f"transcode to Explicit VR Little Endian"
                         for syntax in sorted(set(self._transcode.values()))]
        problems += self._refused
        return "; ".join(dict.fromkeys(problems)), self._stored

    @staticmethod
    def _instance_path(study_uid: str, series: str, sop: str) -> str:
        if not series:
            return f"/studies/{_quote(study_uid)}"
        return f"/studies/{_quote(study_uid)}/series/{_quote(series)}/instances/{_quote(sop)}"

    def _requests(self, requests: list[tuple[str, set[str]]], syntax: str) -> list[str]:
        problems: list[str] = []
        for path, expected in requests:
            try:
                self._call(lambda p=path, e=expected: self._client.retrieve(
                    p, self.incoming, lambda f, c: self._archive(f, c, e, syntax), syntax))
            except RetrieveError as exc:
                problems.append(str(exc))
                if self._lost:
                    break
            except OSError as exc:  # a part could not be written here (disk full)
                problems.append(f"cannot write to {self.incoming}: {exc.strerror or exc}")
                break
        return problems

    def _archive(self, path: Path, complete: bool, expected: set[str], asked: str) -> None:
        """One part: archived if it is an instance asked for, in a transfer syntax the node
        takes (else noted for a transcoded retrieve), and the node's checks pass."""
        from pydicom.errors import InvalidDicomError
        from pydicom.filereader import read_file_meta_info

        from dicomnode.identifiers import RECEIVED_TRANSFER_SYNTAXES
        from dicomnode.network.instance_checks import EncodedInstance, StoreRefused
        from dicomnode.network.scp import archive_instance

        sop_instance = ""
        try:
            if not complete:  # (what was written of it may not even hold the file meta)
                raise StoreRefused(0xC000, "part cut off: the answer ended inside it")
            try:
                meta = read_file_meta_info(path)
            except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
                raise StoreRefused(0xC000, f"not a DICOM file (PS3.10): {exc}") from None
            sop_instance = str(meta.get("MediaStorageSOPInstanceUID", ""))
            if sop_instance not in expected:
                # a series answer holds instances of classes the node does not archive
                return
            syntax = str(meta.get("TransferSyntaxUID", ""))
            if syntax not in RECEIVED_TRANSFER_SYNTAXES:
                series = self._series.get(sop_instance, "")
                self._transcode[sop_instance] = series if asked == "*" else syntax
                return
            encoded = EncodedInstance.from_file(path)
            try:
                archive_instance(self.r.store, encoded, self.r.policy,
                                 calling_ae=self.r.peer.ae_title,
                                 sop_class=str(meta.get("MediaStorageSOPClassUID", "")) or None,
                                 sop_instance=sop_instance)
            finally:
                encoded.close()
            self._stored += 1
        except StoreRefused as refused:
            log.warning("event=retrieve_refused %s", kv(
                sop_instance_uid=sop_instance, status=f"0x{refused.status:04X}",
                comment=refused.comment))
            self._refused.append(f"refused 0x{refused.status:04X}: {refused.comment}")
        finally:
            path.unlink(missing_ok=True)  # gone already where storage took it over


INCOMING_DIR = "retrieve-incoming"
def _quote(uid: str) -> str:
    """A UID as a URL path segment (a peer's answer must not add path segments)."""
    return urllib.parse.quote(uid, safe="")


def matching_studies(key: StudyKey, found: list[str]) -> list[str]:
    """The study UIDs a search returned for ``key``: a peer that ignores the key must not
    widen the match."""
    if key.study_uid:
        found = [u for u in found if u == key.study_uid]
    return sorted({u for u in found if u})


class Retriever:
    """Resolves and fetches studies from one peer into the store (see module doc)."""

    def __init__(self, store: Store, policy: ReceiverPolicy, peer: PeerConfig,
                 ae_title: str, *, method: str | None = None,
                 data_dir: Path | None = None, timeout_s: float = 120.0) -> None:
        from dicomnode.identifiers import BREAST_IMAGE_SOP_CLASSES

        self.store = store
        self.policy = policy
        self.peer = peer
        self.ae_title = ae_title
        self.method = retrieve_method(peer, method)
        self.timeout_s = timeout_s
        self.breast_classes = set(BREAST_IMAGE_SOP_CLASSES)
        if self.method == "wado":
            if data_dir is None:
                raise ConfigError("WADO-RS retrieve needs the node's data_dir for its "
                                  "temporary files")
            self.transport: Transport = WadoTransport(self, data_dir)
        else:
            self.transport = DimseTransport(self, self.method)

    def _wanted(self, remote: dict[str, tuple[str, str]]) -> set[str]:
        """The instances the node archives (its policy): breast images, or all."""
        if self.policy.other_storage == "store":
            return set(remote)
        return {uid for uid, (_, cls) in remote.items()
                if not cls or cls in self.breast_classes}

    def _archived(self, study_uid: str) -> set[str]:
        from storage import StudyNotFound

        try:
            return {i.sop_instance_uid for i in self.store.study_instances(study_uid)}
        except StudyNotFound:
            return set()

    def retrieve(self, keys: list[StudyKey],
                 progress: Callable[[int, int, StudyOutcome], None] | None = None
                 ) -> RetrieveReport:
        """Each key in order; ``progress(i, n, outcome)`` after each study."""
        report = RetrieveReport()
        with self.transport.session():
            for n, key in enumerate(keys, start=1):
                for outcome in self._one(key):
                    report.outcomes.append(outcome)
                    self._after(outcome)
                    if progress is not None:
                        progress(n, len(keys), outcome)
                if self.transport.lost:
                    raise RetrieveError(f"{self.transport.lost} during {key.text}; run again "
                                        "to resume")
        return report

    def _one(self, key: StudyKey) -> list[StudyOutcome]:
        transport = self.transport
        try:
            uids = transport.resolve(key)
        except RetrieveError as exc:
            return [StudyOutcome(key, "error", key.study_uid, detail=str(exc))]
        if not uids:
            return [StudyOutcome(key, "missing", key.study_uid,
                                 detail=f"{self.peer.ae_title} does not hold it")]
        outcomes = []
        for study_uid in uids:
            try:
                remote = transport.remote_instances(study_uid)
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
            missing = {u: remote[u] for u in wanted - have}
            problem, fetched = transport.fetch(study_uid, missing, remote)
            have = self._archived(study_uid) & wanted
            if fetched is None:
                fetched = len(have) - before
            ok = bool(wanted) and have == wanted
            detail = problem if problem else ("" if ok else
                                              f"{len(wanted) - len(have)} instances missing")
            if not wanted:
                detail = "the PACS lists no instances of a class this node archives"
            outcomes.append(StudyOutcome(key, "retrieved" if ok else "incomplete", study_uid,
                                         len(wanted), len(have), fetched, detail))
            if transport.lost:
                break
        return outcomes

    def _after(self, outcome: StudyOutcome) -> None:
        """Audit the study; keep a fetched study out of inference."""
        from storage import InvalidState

        if outcome.status in ("retrieved", "incomplete") and outcome.study_uid:
            job_id = self.store.study_job_id(outcome.study_uid)
            if job_id is not None:
                try:
                    self.store.cancel_job(job_id)
                except InvalidState:
                    pass  # already done or cancelled: nothing will run
        where = (self.peer.dicomweb_url if self.method == "wado"
                 else f"{self.peer.host}:{self.peer.port}")
        self.store.audit("retrieve_study", called_ae=self.peer.ae_title[:16],
                         peer=where[:200],
                         study_uid=outcome.study_uid or None, count=outcome.archived,
                         status=outcome.status, detail=outcome.detail or None)
        log.info("event=retrieve_study %s", kv(
            study_uid=outcome.study_uid, status=outcome.status, wanted=outcome.wanted,
            archived=outcome.archived, method=self.method))
