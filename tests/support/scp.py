"""An in-process Storage SCP on loopback for the receiver tests, and the peers that talk to
it: dcmtk's storescu, and a pynetdicom SCU for single C-ECHOs and C-STOREs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.network.scp import AllowedPeer, ReceiverPolicy, StorageSCP
from storage import Store
from tests.support.peers import NODE_AE, dcmtk

BTO = BreastTomosynthesisImageStorage
MG = DigitalMammographyXRayImageStorageForPresentation


def image_files(study: Path) -> list[Path]:
    return sorted(p for m in ("dbt", "ffdm", "s2d") for p in study.glob(f"*/{m}/*.dcm"))


class Node:
    def __init__(self, root: Path, min_free_bytes: int = 0, other: str = "reject",
                 hold_seconds: float = 1.0) -> None:
        self.store = Store(f"sqlite:///{root / 'db.sqlite'}", root / "archive",
                           min_free_bytes=min_free_bytes)
        policy = ReceiverPolicy(NODE_AE, [AllowedPeer("PACS", "127.0.0.1")],
                                other_storage=other, max_associations=4,
                                patient_key_salt=b"test")
        self.scp = StorageSCP(self.store, policy, "127.0.0.1", 0, hold_seconds=hold_seconds)
        self.scp.start()
        self.port = self.scp.port

    def close(self) -> None:
        self.scp.stop()
        self.store.close()


def storescu(node: Node, files: list[Path], *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("storescu"), "-R", *options, "-aet", "PACS", "-aec", NODE_AE, "127.0.0.1",
         str(node.port), *map(str, files)], capture_output=True, text=True, timeout=120)


def associate(node: Node, contexts: list[str], calling: str = "PACS", called: str = NODE_AE):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    for uid in contexts:
        ae.add_requested_context(uid)
    return ae.associate("127.0.0.1", node.port, ae_title=called)


def still_serves(node: Node) -> bool:
    assoc = associate(node, [Verification])
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def store_status(node: Node, dataset_or_path, sop_class: str) -> tuple[int, str]:
    assoc = associate(node, [sop_class])
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(dataset_or_path)
        return int(rsp.Status), str(rsp.get("ErrorComment", ""))
    finally:
        assoc.release()
