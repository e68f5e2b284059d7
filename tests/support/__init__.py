"""Helpers the tests share; test modules import from here, never from each other.

cli       `dicomnode` commands run in-process; retrieve's report
dicom     small breast DICOM files written directly with pydicom (loader and CLI tests)
peers     real peers on loopback (dcmtk storescp, Orthanc, `dicomnode run`), node configs,
          random checkpoints, bounded waits; dcmtk() and REQUIRE_PEERS for conftest's markers
ops       many small instances, storescu's verbose output, raw C-STOREs, process memory
ohif      the OHIF viewer's static server and headless Chromium over CDP
results   analyses for the result-object tests, and reading returned SR/SEG/PM back
scp       an in-process Storage SCP and the SCUs (storescu, pynetdicom) that talk to it
storage   store fixtures on SQLite and PostgreSQL, instance arguments
storage_procs  functions the storage tests run in spawned processes
synth     synthetic studies generated once per session (conftest's synth_study fixture)
tls       a throwaway PKI (conftest's session pki fixture)
training  tiny models and in-memory volumes for the model and training tests
"""
