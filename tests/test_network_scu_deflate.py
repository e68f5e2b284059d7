"""The SCU sends a deflated result deflated to a peer that accepts deflate, and the same
dataset as Explicit VR Little Endian to one that does not."""

from __future__ import annotations

import datetime

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian as DEFLATED_LE
from pydicom.uid import ExplicitVRLittleEndian as EXPLICIT_LE
from pydicom.uid import ParametricMapStorage as PARAMETRIC_MAP_STORAGE
from pynetdicom import AE, evt

from dicomnode.external import free_port
from dicomnode.network.scu import (
    Destination,
    build_scu,
    send_files,
)
from dicomnode.results import ResultOptions, build_parametric_maps
from dicomnode.results.pmap import real_world_values
from gmic.classes import CLASS_NAMES
from storage.records import DeliveryTask
from tests.support.results import analysis_for


@pytest.mark.parametrize("accepted,expected", [
    ([DEFLATED_LE, EXPLICIT_LE], DEFLATED_LE),
    ([EXPLICIT_LE], EXPLICIT_LE),
])
def test_deflated_map_goes_deflated_or_falls_back(tmp_path_factory, tmp_path, accepted,
                                                  expected) -> None:
    analysis = analysis_for(tmp_path_factory, "enhanced", "ffdm")
    pm = build_parametric_maps(analysis, ResultOptions(pmap_classes=CLASS_NAMES[1:]))[0]
    path = tmp_path / "pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    received = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append((str(event.context.transfer_syntax), ds))
        return 0x0000

    scp = AE(ae_title="PACS")
    scp.add_supported_context(PARAMETRIC_MAP_STORAGE, accepted)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        task = DeliveryTask(id=1, destination="PACS", attempts=0, study_uid="1",
                            sop_instance_uid=str(pm.SOPInstanceUID),
                            sop_class_uid=PARAMETRIC_MAP_STORAGE,
                            transfer_syntax=DEFLATED_LE, path=path,
                            lease_expires_at=datetime.datetime.now())
        outcomes = send_files(build_scu("NODE"), Destination("PACS", "127.0.0.1", port), [task])
    finally:
        server.shutdown()
    assert [o.ok for o in outcomes] == [True], outcomes
    ((syntax, ds),) = received
    assert syntax == expected
    assert (real_world_values(ds) == real_world_values(pm)).all()  # lossless either way
