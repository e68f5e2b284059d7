"""WADO-RS retrieve against a small DICOMweb server on 127.0.0.1 that the test controls:
bearer token, instance-by-instance fetch of what a partly archived series lacks, a part cut
off mid-body (incomplete, no file left, completed by the next run), a refused token, and
kept-alive connections."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless

from dicomnode.config import Config, NodeConfig, PeerConfig
from dicomnode.errors import ConfigError
from dicomnode.network.instance_checks import EncodedInstance
from dicomnode.network.retrieve import RetrieveError, Retriever, StudyKey, retrieve_method
from dicomnode.network.scp import archive_instance
from dicomnode.wiring import open_store, policy_from_config

TOKEN = "wado-test-token"
SERIES = "1.2.826.0.1.3680043.10.999.7"  # the server files every instance under this series
BOUNDARY = "test-boundary-1234"


@dataclass
class FakePacs:
    files: dict[str, Path]  # SOP Instance UID -> file
    study: str
    accession: str
    cut_off: set[str] = field(default_factory=set)  # instances whose part is cut short once
    # instances stored in a syntax the node does not take; sent as `files` has them when
    # asked for Explicit VR Little Endian if the server transcodes
    odd_syntax: dict[str, Path] = field(default_factory=dict)
    transcodes: bool = True
    requests: list[str] = field(default_factory=list)
    connections: int = 0

    def instances_json(self) -> list[dict]:
        out = []
        for sop, path in sorted(self.files.items()):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out.append({"0020000D": {"vr": "UI", "Value": [self.study]},
                        "0020000E": {"vr": "UI", "Value": [SERIES]},
                        "00080016": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                        "00080018": {"vr": "UI", "Value": [sop]}})
        return out


def _handler(pacs: FakePacs) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def log_message(self, *args: object) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            pacs.connections += 1

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            pacs.requests.append(self.path)
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, b"bad token", "text/plain")
                return
            path, _, query = self.path.partition("?")
            base = "/dicom-web"
            if path == f"{base}/studies":
                match = (f"StudyInstanceUID={pacs.study}" in query
                         or f"AccessionNumber={pacs.accession}" in query)
                body = [{"0020000D": {"vr": "UI", "Value": [pacs.study]}}] if match else []
                self._send(200, json.dumps(body).encode(), "application/dicom+json")
            elif path == f"{base}/studies/{pacs.study}/instances":
                self._send(200, json.dumps(pacs.instances_json()).encode(),
                           "application/dicom+json")
            elif path.startswith(f"{base}/studies/{pacs.study}/series/{SERIES}"):
                sop = path.rpartition("/instances/")[2] if "/instances/" in path else ""
                explicit = "transfer-syntax=1.2.840.10008.1.2.1" in self.headers["Accept"]
                self._multipart([sop] if sop else sorted(pacs.files),
                                explicit and pacs.transcodes)
            else:
                self._send(404, b"[]", "application/dicom+json")

        def _multipart(self, sops: list[str], transcoded: bool) -> None:
            if any(s not in pacs.files for s in sops):
                self._send(404, b"no such instance", "text/plain")
                return
            body = b""
            for sop in sops:
                data = (pacs.files if transcoded else {**pacs.files, **pacs.odd_syntax}
                        )[sop].read_bytes()
                body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                if sop in pacs.cut_off:  # the connection drops in the middle of this part
                    pacs.cut_off.discard(sop)
                    body += data[:len(data) // 2]
                    self.send_response(200)
                    self.send_header("Content-Type", "multipart/related; "
                                     f'type="application/dicom"; boundary={BOUNDARY}')
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                    self.close_connection = True
                    return
                body += data + b"\r\n"
            body += f"--{BOUNDARY}--".encode()
            self._send(200, body,
                       f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')

    return Handler


@pytest.fixture(scope="module")
def study_files(synth_study) -> tuple[str, str, dict[str, Path]]:
    out = synth_study(studies=1, modalities=("s2d",), seed=7)
    files = {}
    for path in sorted(out.rglob("s2d/*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        files[str(ds.SOPInstanceUID)] = path
        study, accession = str(ds.StudyInstanceUID), str(ds.AccessionNumber)
    return study, accession, files


@contextmanager
def serve(study_files, context: ssl.SSLContext | None = None
          ) -> Iterator[tuple[FakePacs, str]]:
    study, accession, files = study_files
    fake = FakePacs(files, study, accession)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme, host = ("https", "localhost") if context else ("http", "127.0.0.1")
    try:
        yield fake, f"{scheme}://{host}:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def pacs(study_files) -> Iterator[tuple[FakePacs, str]]:
    with serve(study_files) as served:
        yield served


def _config(tmp_path: Path, url: str, token: str = TOKEN) -> Config:
    peer = PeerConfig("WEBPACS", send_results=False, retrieve=True, dicomweb_url=url,
                      token=token)
    return Config(node=NodeConfig(data_dir=str(tmp_path / "data")), peers=[peer])


def _retriever(store, config: Config) -> Retriever:
    return Retriever(store, policy_from_config(config), config.peers[0], "DICOMNODE",
                     data_dir=config.data_path, timeout_s=20)


def test_partial_series_fetched_instance_by_instance_and_cut_part_resumed(
        pacs, tmp_path: Path) -> None:
    fake, url = pacs
    config = _config(tmp_path, url)
    sops = sorted(fake.files)
    fake.cut_off = {sops[2]}
    with open_store(config) as store:
        archive_instance(store, EncodedInstance(fake.files[sops[0]].read_bytes()),
                         policy_from_config(config), calling_ae="WEBPACS")
        retriever = _retriever(store, config)
        assert retriever.method == "wado"  # automatic: the peer has only a dicomweb_url
        report = retriever.retrieve([StudyKey("", fake.accession, 2),
                                     StudyKey("1.2.3.999", "", 3)])
        first, absent = report.outcomes
        assert (absent.status, absent.detail) == ("missing", "WEBPACS does not hold it")
        # the series is partly archived: its 3 other instances, one request each; the one
        # cut off mid-body is not archived, and its part file is gone
        assert first.status == "incomplete" and first.archived == 3 and first.fetched == 2
        assert "cut off" in first.detail
        fetches = [p for p in fake.requests if "/series/" in p]
        assert sorted(fetches) == sorted(f"/dicom-web/studies/{fake.study}/series/{SERIES}"
                                         f"/instances/{s}" for s in sops[1:])
        assert not list((tmp_path / "data" / "retrieve-incoming").iterdir())

        # run again: only the instance that did not arrive is fetched
        fake.requests.clear()
        report = _retriever(store, config).retrieve([StudyKey(fake.study, "", 2)])
        (again,) = report.outcomes
        assert (again.status, again.archived, again.fetched) == ("retrieved", 4, 1)
        assert [p for p in fake.requests if "/series/" in p] == [
            f"/dicom-web/studies/{fake.study}/series/{SERIES}/instances/{sops[2]}"]
        instances = store.study_instances(fake.study)
        assert {i.calling_ae for i in instances} == {"WEBPACS"}
        assert sorted(i.sop_instance_uid for i in instances) == sops

        report = _retriever(store, config).retrieve([StudyKey(fake.study, "", 2)])
        assert report.outcomes[0].status == "complete"


def test_whole_series_in_one_request_on_a_kept_alive_connection(pacs, tmp_path: Path) -> None:
    fake, url = pacs
    config = _config(tmp_path, url)
    with open_store(config) as store:
        report = _retriever(store, config).retrieve([StudyKey(fake.study, "", 2)])
    assert report.outcomes[0].status == "retrieved" and report.outcomes[0].fetched == 4
    assert [p for p in fake.requests if "/series/" in p] == [
        f"/dicom-web/studies/{fake.study}/series/{SERIES}"]
    assert fake.connections == 1  # QIDO and WADO requests on one connection


def test_wrong_token_stops_the_run_and_names_the_token(pacs, tmp_path: Path) -> None:
    fake, url = pacs
    config = _config(tmp_path, url, token="not-the-token")
    with open_store(config) as store, pytest.raises(RetrieveError) as exc:
        _retriever(store, config).retrieve([StudyKey(fake.study, "", 2),
                                            StudyKey("1.2.3.4", "", 3)])
    message = str(exc.value)
    assert "WEBPACS refused the credentials" in message and "HTTP 401" in message
    assert "check the peer's token" in message and "run again to resume" in message
    assert len(fake.requests) == 1  # the second study was not tried


def test_mutual_tls_with_the_peers_ca_certificate_and_key(study_files, pki: Path,
                                                          tmp_path: Path) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "node.crt"), str(pki / "node.key"))
    context.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no answer
    with serve(study_files, context) as (fake, url):
        config = _config(tmp_path, url)
        peer = config.peers[0]
        peer.dicomweb_ca = str(pki / "ca.crt")
        with open_store(config) as store:
            with pytest.raises(RetrieveError, match="did not answer"):
                _retriever(store, config).retrieve([StudyKey(fake.study, "", 2)])
            assert fake.requests == []
            peer.dicomweb_cert, peer.dicomweb_key = str(pki / "pacs.crt"), str(pki / "pacs.key")
            report = _retriever(store, config).retrieve([StudyKey(fake.study, "", 2)])
    assert report.outcomes[0].status == "retrieved" and report.outcomes[0].archived == 4


def test_client_usable_after_a_part_it_could_not_keep(pacs, tmp_path: Path) -> None:
    from dicomnode.dicomweb.client import StowTarget
    from dicomnode.dicomweb.wado import DicomwebClient

    fake, url = pacs

    def refuse(path: Path, complete: bool) -> None:
        path.unlink()
        raise OSError(28, "No space left on device")

    with DicomwebClient(StowTarget(url, token=TOKEN)) as client:
        with pytest.raises(OSError, match="No space"):
            client.retrieve(f"/studies/{fake.study}/series/{SERIES}", tmp_path, refuse)
        # the answer was left half read: the next request goes on a new connection
        assert len(client.search(f"/studies/{fake.study}/instances")) == 4
    assert fake.connections == 2 and not list(tmp_path.glob("part-*"))


def _in_syntax(path: Path, out: Path, syntax: str) -> Path:
    """The file with its meta saying ``syntax`` (the dataset bytes as they are)."""
    from pynetdicom.dsutils import encode_file_meta

    from dicomnode.network.instance_checks import dataset_offset

    encoded = EncodedInstance(path.read_bytes())
    offset = dataset_offset(encoded)
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = syntax
    out.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
                    + path.read_bytes()[offset:])
    return out


@pytest.mark.parametrize("transcodes", [True, False])
def test_a_syntax_the_node_does_not_take_is_asked_for_transcoded(
        pacs, tmp_path: Path, transcodes: bool) -> None:
    fake, url = pacs
    sop = sorted(fake.files)[1]
    htj2k = HTJ2KLossless  # High-Throughput JPEG 2000 lossless: not taken
    fake.odd_syntax = {sop: _in_syntax(fake.files[sop], tmp_path / "odd.dcm", htj2k)}
    fake.transcodes = transcodes
    config = _config(tmp_path, url)
    with open_store(config) as store:
        report = _retriever(store, config).retrieve([StudyKey(fake.study, "", 2)])
        (outcome,) = report.outcomes
        # the series first, as stored; then that instance alone, transcoded
        assert [p for p in fake.requests if "/series/" in p] == [
            f"/dicom-web/studies/{fake.study}/series/{SERIES}",
            f"/dicom-web/studies/{fake.study}/series/{SERIES}/instances/{sop}"]
        syntaxes = {i.sop_instance_uid: i.transfer_syntax
                    for i in store.study_instances(fake.study)}
    if transcodes:
        assert (outcome.status, outcome.archived, outcome.fetched) == ("retrieved", 4, 4)
        assert syntaxes[sop] == ExplicitVRLittleEndian
    else:
        assert (outcome.status, outcome.archived) == ("incomplete", 3)
        assert sop not in syntaxes
        assert f"transfer syntax {htj2k} not accepted" in outcome.detail


def test_method_choice() -> None:
    web = PeerConfig("W", dicomweb_url="https://pacs/dicom-web")
    assert retrieve_method(web) == "wado"
    assert retrieve_method(web, "get") == "get"
    assert retrieve_method(PeerConfig("D")) == "get"
    assert retrieve_method(PeerConfig("D", retrieve_method="move")) == "move"
    with pytest.raises(ConfigError, match="has no dicomweb_url"):
        retrieve_method(PeerConfig("D"), "wado")
