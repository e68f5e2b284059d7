"""STOW-RS in (dicomnode.dicomweb.stow) and out (scu.send_stow), in process on loopback:
what is stored, each refusal with its HTTP status and Failure Reason, and the node serving
on (a second good STOW-RS, a C-ECHO) after each."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.config import Config, PeerConfig, TLSConfig, load_config
from dicomnode.dicomweb.client import StowTarget, post_instances
from dicomnode.dicomweb.multipart import MultipartReader, multipart_body
from dicomnode.dicomweb.stow import StowAuth, StowServer, hash_token, stow_ssl_context
from dicomnode.errors import ConfigError
from dicomnode.network.scp import AllowedPeer, ReceiverPolicy, StorageSCP
from dicomnode.network.scu import Deliverer, Destination
from dicomnode.ops import prometheus as metrics
from storage import Store
from tests.support.ops import sop_uid
from tests.support.peers import NODE_AE
from tests.support.synth import SMALL

TOKEN = "s3cret-token-for-pacs"
CT = CTImageStorage


@pytest.fixture(scope="module")
def study(synth_study) -> Path:
    return synth_study(**SMALL)


def image_files(study: Path) -> list[Path]:
    return sorted(p for m in ("dbt", "ffdm", "s2d") for p in study.glob(f"*/{m}/*.dcm"))


class Node:
    """Store + C-STORE SCP + STOW-RS endpoint sharing one policy, as `dicomnode serve`."""

    def __init__(self, root: Path, *, max_body_mb: int = 4096, max_requests: int = 8,
                 ssl_context: ssl.SSLContext | None = None,
                 common_names: dict[str, str] | None = None) -> None:
        self.store = Store(f"sqlite:///{root / 'db.sqlite'}", root / "archive")
        policy = ReceiverPolicy(NODE_AE, [AllowedPeer("PACS", "127.0.0.1")],
                                patient_key_salt=b"test")
        self.scp = StorageSCP(self.store, policy, "127.0.0.1", 0)
        self.scp.start()
        auth = StowAuth({hash_token(TOKEN): "PACS"}, common_names or {})
        self.stow = StowServer(self.store, policy, root, "127.0.0.1:0", auth=auth,
                               max_body_mb=max_body_mb, max_requests=max_requests,
                               ssl_context=ssl_context,
                               hold_seconds=0.2)
        self.stow.start()

    def close(self) -> None:
        self.stow.stop()
        self.scp.stop()
        self.store.close()

    def echo(self) -> bool:
        ae = AE(ae_title="PACS")
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.scp.port, ae_title=NODE_AE)
        try:
            return assoc.is_established and assoc.send_c_echo().Status == 0
        finally:
            if assoc.is_established:
                assoc.release()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "node")
    yield n
    n.close()


def post(port: int, body: bytes, *, token: str | None = TOKEN, path: str = "/studies",
         content_type: str | None = None, boundary: str = "b0undary",
         headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        hdrs = {"Content-Type": content_type or
                f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Content-Length": str(len(body)), **(headers or {})}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request("POST", path, body=body, headers=hdrs)
        rsp = conn.getresponse()
        data = rsp.read()
        return rsp.status, (json.loads(data) if data else {}), dict(rsp.getheaders())
    finally:
        conn.close()


def body_of(paths: list[Path], boundary: str = "b0undary") -> bytes:
    return b"".join(multipart_body(paths, boundary))


def failures(response: dict) -> dict[str, int]:
    items = response.get("00081198", {}).get("Value", [])
    return {i.get("00081155", {}).get("Value", [""])[0]: i["00081197"]["Value"][0]
            for i in items}


def stored(response: dict) -> set[str]:
    items = response.get("00081199", {}).get("Value", [])
    return {i["00081155"]["Value"][0] for i in items}


def good_stow_still_works(node: Node, study: Path) -> None:
    one = image_files(study)[-1]
    status, response, _ = post(node.stow.port, body_of([one]))
    assert status == 200 and stored(response) == {sop_uid(one)}
    assert node.echo()


# -- parsing -------------------------------------------------------------------------------


def test_multipart_reader_streams_parts_across_small_chunks() -> None:
    parts = [b"first\r\n--not-the-boundary", b"", b"x" * 5000]
    body = b"preamble\r\n" + b"".join(
        b"--bnd\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts
    ) + b"--bnd--\r\n"
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        n = min(n, 7)  # a tiny chunk: delimiters straddle every read
        pos += n
        return body[pos - n:pos]

    reader = MultipartReader(read, "bnd", chunk=7)
    got, held = [], []
    while (headers := reader.next_part()) is not None:
        assert headers == {"content-type": "application/dicom"}
        out = bytearray()

        def write(view: memoryview, out: bytearray = out) -> None:
            held.append(len(reader._buf))  # what the reader holds while it streams
            out.extend(view)
        assert reader.copy_body(write, write_min=16)
        got.append(bytes(out))
    assert got == parts and reader.closed and not reader.truncated
    # streaming: never more than a write piece, a read and a delimiter's length in memory
    assert max(held) <= 16 + 7 + len(b"\r\n--bnd")


def test_multipart_reader_reports_a_truncated_part() -> None:
    body = b"--bnd\r\n\r\nwhole\r\n--bnd\r\n\r\ncut off here"
    data = [body]
    reader = MultipartReader(lambda n: data.pop() if data else b"", "bnd")
    assert reader.next_part() == {}
    out = bytearray()
    assert reader.copy_body(out.extend) and out == b"whole"
    assert reader.next_part() == {}
    out.clear()
    assert not reader.copy_body(out.extend)
    assert reader.truncated


# -- receiving -----------------------------------------------------------------------------


def test_stow_study_is_archived_byte_for_byte_as_the_peer(node: Node, study: Path) -> None:
    files = image_files(study)
    before = metrics.STOW_REQUESTS.value(status="200")
    status, response, headers = post(node.stow.port, body_of(files))
    assert status == 200, response
    assert headers["Content-Type"] == "application/dicom+json"
    assert stored(response) == {sop_uid(p) for p in files} and not failures(response)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    archived = {a.sop_instance_uid: a for a in node.store.study_instances(study_uid)}
    assert len(archived) == len(files) == 12
    for path in files:
        got = archived[sop_uid(path)]
        assert got.path.read_bytes() == path.read_bytes()  # stored as sent
        assert got.calling_ae == "PACS"  # the token's peer: routing and completion as C-STORE
    assert {(a.modality, a.laterality, a.view) for a in archived.values()} >= {
        ("dbt", "L", "CC"), ("s2d", "R", "MLO"), ("ffdm", "L", "MLO")}
    jobs = node.store.list_jobs()
    assert [(j.study_uid, j.calling_ae) for j in jobs] == [(study_uid, "PACS")]
    assert metrics.STOW_REQUESTS.value(status="200") == before + 1
    trail = [e for e in node.store.audit_trail() if e.event == "stow"]
    assert (trail[-1].calling_ae, trail[-1].count, trail[-1].status) == ("PACS", 12, "200")
    assert not list((node.stow.receiver.incoming).iterdir())  # no temp file left behind
    # re-sent: stored once (duplicate), still a success
    status, response, _ = post(node.stow.port, body_of(files[:2]), path=f"/studies/{study_uid}")
    assert status == 200 and len(node.store.study_instances(study_uid)) == 12


def test_study_is_held_while_its_request_streams(node: Node, study: Path) -> None:
    """As for an open association: a study is not complete while a request that brought
    it is still receiving (its next part may be a DBT on the wire)."""
    files = image_files(study)[:2]
    body = body_of(files)
    first_end = body.index(b"\r\n--b0undary", 10) + 200  # into the second part
    head = (f"POST /studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            'Content-Type: multipart/related; type="application/dicom"; boundary=b0undary\r\n'
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", node.stow.port), timeout=60) as s:
        s.sendall(head + body[:first_end])
        deadline = time.monotonic() + 30
        while not node.store.list_jobs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.store.list_jobs(), "the first part was not stored"
        time.sleep(3.0)
        assert node.store.mark_ready(idle_seconds=2.0) == []  # held: still receiving
        s.sendall(body[first_end:])
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    time.sleep(2.5)
    assert len(node.store.mark_ready(idle_seconds=2.0)) == 1  # complete once idle


def test_requests_over_max_requests_are_503(tmp_path: Path, study: Path) -> None:
    node = Node(tmp_path / "node", max_requests=1)
    try:
        body = body_of(image_files(study)[:1])
        head = (f"POST /studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                'Content-Type: multipart/related; type="application/dicom"; boundary=b0undary'
                f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", node.stow.port), timeout=60) as slow:
            slow.sendall(head + body[:100])  # holds the one slot
            time.sleep(0.5)
            status, _, headers = post(node.stow.port, body)
            assert status == 503 and headers["Retry-After"]
            slow.sendall(body[100:])
            assert slow.recv(65536).startswith(b"HTTP/1.1 200")
        good_stow_still_works(node, study)
    finally:
        node.close()


def test_chunked_body_is_accepted(node: Node, study: Path) -> None:
    files = image_files(study)[:3]
    conn = http.client.HTTPConnection("127.0.0.1", node.stow.port, timeout=60)
    conn.request("POST", "/studies", body=multipart_body(files, "bnd"), encode_chunked=True,
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type":
                          'multipart/related; type="application/dicom"; boundary=bnd'})
    rsp = conn.getresponse()
    response = json.loads(rsp.read())
    conn.close()
    assert rsp.status == 200 and stored(response) == {sop_uid(p) for p in files}


def test_instance_of_another_study_is_refused_with_a900(node: Node, study: Path) -> None:
    files = image_files(study)[:2]
    status, response, _ = post(node.stow.port, body_of(files), path=f"/studies/{generate_uid()}")
    assert status == 409
    assert failures(response) == {sop_uid(p): 0xA900 for p in files}
    good_stow_still_works(node, study)


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_no_or_wrong_token_is_401(node: Node, study: Path, token: str | None) -> None:
    files = image_files(study)[:1]
    status, response, headers = post(node.stow.port, body_of(files), token=token)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert node.store.list_jobs() == []  # nothing stored, no study
    rejected = [e for e in node.store.audit_trail() if e.event == "stow_rejected"]
    assert rejected[-1].status == "401"
    good_stow_still_works(node, study)


def test_expect_100_continue_refusal_comes_before_the_body(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", node.stow.port), timeout=10) as s:
        s.sendall(b"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n"
                  b'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
                  b"Expect: 100-continue\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401")  # no 100 Continue: the body is never sent


@pytest.mark.parametrize("content_type", [
    "application/dicom",
    'multipart/related; type="application/dicom+xml"; boundary=b0undary',
    "application/json",
])
def test_wrong_media_type_is_415(node: Node, study: Path, content_type: str) -> None:
    status, _, _ = post(node.stow.port, body_of(image_files(study)[:1]),
                        content_type=content_type)
    assert status == 415
    assert metrics.STOW_REQUESTS.value(status="415") >= 1
    good_stow_still_works(node, study)


def test_truncated_part_is_refused_and_the_whole_ones_stored(node: Node, study: Path) -> None:
    files = image_files(study)[:2]
    body = body_of(files)
    cut = body[:len(body) - 4000]  # into the second file's pixel data, no close delimiter
    status, response, _ = post(node.stow.port, cut)
    assert status == 202
    assert stored(response) == {sop_uid(files[0])}
    assert failures(response) == {sop_uid(files[1]): 0xC000}
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert [a.sop_instance_uid for a in node.store.study_instances(study_uid)] == \
        [sop_uid(files[0])]
    assert not list(node.stow.receiver.incoming.iterdir())
    good_stow_still_works(node, study)


def test_client_that_hangs_up_mid_part_leaves_nothing_behind(node: Node, study: Path) -> None:
    files = image_files(study)[:2]
    body = body_of(files)
    head = (f"POST /studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            'Content-Type: multipart/related; type="application/dicom"; boundary=b0undary\r\n'
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", node.stow.port), timeout=60) as s:
        s.sendall(head + body[:len(body) - 5000])  # gone before the second part's end
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
            e.event == "stow" for e in node.store.audit_trail()):
        time.sleep(0.1)
    stow = [e for e in node.store.audit_trail() if e.event == "stow"]
    assert (stow[-1].count, stow[-1].status) == (1, "202")  # the whole first part is kept
    assert not list(node.stow.receiver.incoming.iterdir())
    good_stow_still_works(node, study)


def test_only_stale_part_files_are_swept(node: Node) -> None:
    import os

    incoming = node.stow.receiver.incoming
    old, fresh = incoming / "part-old", incoming / "part-fresh"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert node.stow.receiver.sweep() == 1
    assert not old.exists() and fresh.exists()  # may be another process's request


def test_missing_close_delimiter_fails_the_last_part(node: Node, study: Path) -> None:
    files = image_files(study)[:1]
    body = body_of(files)
    status, response, _ = post(node.stow.port, body[:body.rindex(b"\r\n--b0undary--")])
    assert status == 409 and failures(response) == {sop_uid(files[0]): 0xC000}


def _ct_file(path: Path) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_unaccepted_sop_class_is_0122(node: Node, study: Path, tmp_path: Path) -> None:
    ct = _ct_file(tmp_path / "ct.dcm")
    good = image_files(study)[0]
    status, response, _ = post(node.stow.port, body_of([ct, good]))
    assert status == 202
    assert failures(response) == {sop_uid(ct): 0x0122}
    assert stored(response) == {sop_uid(good)}
    assert metrics.STOW_INSTANCES.value(result="0x0122") >= 1
    status, response, _ = post(node.stow.port, body_of([ct]))
    assert status == 409 and failures(response) == {sop_uid(ct): 0x0122}
    good_stow_still_works(node, study)


def test_part_that_is_not_dicom_is_c000(node: Node, study: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 100)
    status, response, _ = post(node.stow.port, body_of([junk]))
    assert status == 409 and list(failures(response).values()) == [0xC000]
    good_stow_still_works(node, study)


def test_malformed_body_is_400(node: Node, study: Path) -> None:
    status, _, _ = post(node.stow.port, b"no boundary here at all")
    assert status == 400
    good_stow_still_works(node, study)


def test_oversized_body_is_413(tmp_path: Path, study: Path) -> None:
    node = Node(tmp_path / "node", max_body_mb=1)
    try:
        big = [p for p in image_files(study) if p.stat().st_size > 2**20][:1]
        assert big, "the small study has an instance over 1 MB"
        status, _, _ = post(node.stow.port, body_of(big))
        assert status == 413
        # chunked: no length up front, refused once past the limit while reading
        conn = http.client.HTTPConnection("127.0.0.1", node.stow.port, timeout=60)
        conn.putrequest("POST", "/studies")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for chunk in multipart_body(big, "b", chunk=65536):
                conn.send(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n")
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        rsp = conn.getresponse()
        assert rsp.status == 413
        conn.close()
        assert metrics.STOW_REQUESTS.value(status="413") >= 2
        small = [p for p in image_files(study) if p.stat().st_size < 2**19][:1]
        status, response, _ = post(node.stow.port, body_of(small))
        assert status == 200 and node.echo()
    finally:
        node.close()


# -- mutual TLS ----------------------------------------------------------------------------


def test_mutual_tls_identifies_the_peer_by_certificate(tmp_path: Path, study: Path,
                                                       pki: Path) -> None:
    context = stow_ssl_context(TLSConfig(cert=str(pki / "node.crt"), key=str(pki / "node.key"),
                                         ca=str(pki / "ca.crt"), require_client_cert=True))
    node = Node(tmp_path / "node", ssl_context=context, common_names={"pacs.hospital": "PACS"})
    try:
        files = image_files(study)[:2]
        url = f"https://localhost:{node.stow.port}"
        rsp = post_instances(StowTarget(url, ca=str(pki / "ca.crt"), cert=str(pki / "pacs.crt"),
                                        key=str(pki / "pacs.key")), files)
        assert rsp.status == 200 and rsp.stored == {sop_uid(p) for p in files}
        uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert {a.calling_ae for a in node.store.study_instances(uid)} == {"PACS"}
        # a certificate of the CA that is no peer's: authenticated, not authorised
        rsp = post_instances(StowTarget(url, ca=str(pki / "ca.crt"), cert=str(pki / "other.crt"),
                                        key=str(pki / "other.key")), files)
        assert rsp.status == 403
        # no certificate: the TLS handshake itself fails
        from dicomnode.dicomweb.client import StowError

        with pytest.raises(StowError):
            post_instances(StowTarget(url, ca=str(pki / "ca.crt")), files)
        assert node.echo()
        # a token still works over TLS without a client certificate? No: mTLS is required
        # first; the same client with a certificate and the token is the token's peer.
        rsp = post_instances(StowTarget(url, token=TOKEN, ca=str(pki / "ca.crt"),
                                        cert=str(pki / "other.crt"), key=str(pki / "other.key")),
                             files[:1])
        assert rsp.status == 200
    finally:
        node.close()


# -- sending (results out by STOW-RS through the delivery queue) ----------------------------


def test_deliveries_go_out_by_stow_rs_with_retries(tmp_path: Path, study: Path) -> None:
    """The delivery queue sends to a DICOMweb destination (here a second node's STOW-RS):
    a wrong token fails and backs off, the right one delivers."""
    receiver = Node(tmp_path / "receiver")
    sender = Store(f"sqlite:///{tmp_path / 'sender.sqlite'}", tmp_path / "sender",
                   backoff_initial_s=0.0, backoff_max_s=0.0, delivery_max_attempts=3)
    try:
        files = image_files(study)[:2]
        first = dcmread(files[0], stop_before_pixels=True)
        sender.store_instance(  # results are stored only for a received study
            encoded=files[0].read_bytes(), sop_instance_uid=generate_uid(),
            sop_class_uid=str(first.SOPClassUID), study_uid=str(first.StudyInstanceUID),
            series_uid=generate_uid(), transfer_syntax=str(first.file_meta.TransferSyntaxUID),
            patient_key="p")
        ids = []
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            result = sender.store_result(
                encoded=path.read_bytes(), sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID), study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID), kind="sr", job_id=None)
            ids.append(sender.enqueue_delivery(result.id, "WEBPACS"))
        url = f"http://127.0.0.1:{receiver.stow.port}/"
        wrong = Destination("WEBPACS", "", 0, stow=StowTarget(url, token="nope"))
        deliverer = Deliverer(sender, NODE_AE, {"WEBPACS": wrong}, "w1")
        assert deliverer.run_once() == 2
        assert deliverer.failures == 2 and deliverer.sent == 0
        pending = sender.list_deliveries(state="pending")
        assert {d.last_status for d in pending} == {"http-401"}
        deliverer.destinations = {"WEBPACS": Destination("WEBPACS", "", 0,
                                                         stow=StowTarget(url, token=TOKEN))}
        assert deliverer.run_once() == 2
        assert deliverer.sent == 2
        assert {d.state for d in sender.list_deliveries()} == {"done"}
        uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert len(receiver.store.study_instances(uid)) == 2
    finally:
        sender.close()
        receiver.close()


def test_stow_sender_splits_requests_by_size(tmp_path: Path, study: Path) -> None:
    from datetime import datetime

    from dicomnode.network.scu import send_stow
    from storage.records import DeliveryTask

    receiver = Node(tmp_path / "receiver")
    try:
        files = image_files(study)[:3]
        tasks = []
        for i, path in enumerate(files):
            ds = dcmread(path, stop_before_pixels=True)
            tasks.append(DeliveryTask(i, "WEB", 1, str(ds.StudyInstanceUID),
                                      str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                      str(ds.file_meta.TransferSyntaxUID), path, datetime.now()))
        tasks.append(DeliveryTask(9, "WEB", 1, "", "1.2.3", "", "", tmp_path / "gone.dcm",
                                  datetime.now()))
        target = StowTarget(f"http://127.0.0.1:{receiver.stow.port}", token=TOKEN)
        outcomes = send_stow(target, tasks, max_request_bytes=1)  # one request per file
        assert [o.ok for o in outcomes] == [True, True, True, False]
        assert outcomes[-1].status == "unreadable"
        assert receiver.stow.receiver.requests == 3
    finally:
        receiver.close()


def test_config_peers_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[dicomweb]
listen = "127.0.0.1:0"
max_body_mb = 10

[[peers]]
ae_title = "PACS"
token_sha256 = "{hash_token(TOKEN)}"
dicomweb_url = "https://pacs.example.org/dicom-web"
token = "outbound"
""")
    config = load_config(path, environ={})
    assert config.dicomweb.max_body_mb == 10
    from dicomnode.wiring import destinations_from_config

    dest = destinations_from_config(config)["PACS"]
    assert dest.stow == StowTarget("https://pacs.example.org/dicom-web", token="outbound")
    assert StowAuth.from_config(config).for_token(TOKEN) == "PACS"
    assert StowAuth.from_config(config).for_token("other") is None
    from dicomnode.config import validate

    no_auth = Config()
    no_auth.dicomweb.listen = "8081"
    with pytest.raises(ConfigError, match="nothing can authenticate"):
        validate(no_auth)
    with pytest.raises(ConfigError, match="token_sha256"):
        validate(Config(peers=[PeerConfig("X", token_sha256="abc")]))


@pytest.mark.dcmtk
def test_bench_stow_reports_the_ratio(study: Path, tmp_path: Path) -> None:
    """The benchmark's machinery on the small study (the figure itself is from full size)."""
    from dicomnode.bench.stow_receive import run_stow_bench

    files = sorted(study.glob("*/dbt/*.dcm"))
    report = run_stow_bench(files, 1, tmp_path)
    assert [r["name"] for r in report.rows] == ["C-STORE", "STOW-RS"]
    assert report.ratios[0].name == "STOW-RS / C-STORE throughput"
    assert report.ratios[0].value > 0
    assert not list(tmp_path.iterdir())  # archives removed
