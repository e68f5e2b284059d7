"""Issue 15: what a hospital network may send the node, over real sockets on 127.0.0.0/8.

- peer checks: calling AE AND source address (IP, host name, CIDR, "*"); no peers, no
  admission unless [node] accept_any_peer;
- a hostile network cannot starve the node: silent and half-sent connections are closed
  after [node] association_request_seconds, pending connections from unknown addresses do
  not take the configured peers' slots, idle associations are dropped;
- a PDU announcing 4 GB is refused before it is read (the node's memory stays flat);
- a C-STORE-RQ without Affected SOP Instance UID: the association is aborted cleanly, no
  temporary file is left, the open-associations gauge comes back to 0;
- bursts of SIGTERM/SIGINT stop `dicomnode run`, never deadlock it.

Every loop here is bounded by a deadline or a count.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.config import load_config
from dicomnode.scp import AllowedPeer, ReceiverPolicy, StorageSCP, policy_from_config
from storage import Store
from tests.peers import free_port, node_process, wait_for, write_config

NODE_AE = "DICOMNODE"
NO_MODELS = {"dbt": "none", "ffdm": "none", "s2d": "none"}
PACS = {"ae_title": "PACS", "host": "127.0.0.1", "port": 1, "send_results": False}
# A-ASSOCIATE-RQ header claiming a PDU of 4 GB, then nothing (the campaign's bytes).
HUGE_RQ_HEADER = bytes.fromhex("0100ffffffff0001")


def loopback_alias_works(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


needs_aliases = pytest.mark.skipif(
    not (loopback_alias_works("127.0.0.2") and loopback_alias_works("127.0.0.5")),
    reason="this host cannot bind 127.0.0.2 (no 127.0.0.0/8 loopback)")


class Node:
    """A Storage SCP in this process (what `dicomnode serve` runs), on an ephemeral port."""

    def __init__(self, root: Path, policy: ReceiverPolicy, **limits) -> None:
        self.store = Store(f"sqlite:///{root / 'db.sqlite'}", root / "archive",
                           min_free_bytes=0)
        self.scp = StorageSCP(self.store, policy, "127.0.0.1", 0, **limits)
        self.scp.start()
        self.port = self.scp.port

    def close(self) -> None:
        self.scp.stop()
        self.store.close()


def policy(peers: list[AllowedPeer], **kwargs) -> ReceiverPolicy:
    return ReceiverPolicy(NODE_AE, peers, patient_key_salt=b"t", **kwargs)


def echo(port: int, *, calling: str = "PACS", source: str = "127.0.0.1",
         timeout: float = 10) -> str:
    """C-ECHO from ``source``: "ok", "rejected", "aborted" or "failed"."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, bind_address=(source, 0))
    if assoc.is_rejected:
        return "rejected"
    if not assoc.is_established:
        return "aborted" if assoc.is_aborted else "failed"
    try:
        rsp = assoc.send_c_echo()
        return "ok" if rsp and rsp.Status == 0 else "failed"
    finally:
        if assoc.is_established:
            assoc.release()


# ------------------------------------------------------------------- 1: peer checks


@needs_aliases
@pytest.mark.parametrize(("host", "calling", "source", "expected"), [
    ("127.0.0.1", "PACS", "127.0.0.1", "ok"),
    ("127.0.0.1", "PACS", "127.0.0.2", "rejected"),  # the campaign's case: an IP peer
    ("127.0.0.1", "OTHER", "127.0.0.1", "rejected"),
    ("localhost", "PACS", "127.0.0.1", "ok"),  # a host name: any of its addresses
    ("localhost", "PACS", "127.0.0.2", "rejected"),
    ("127.0.0.0/30", "PACS", "127.0.0.2", "ok"),  # a CIDR range
    ("127.0.0.0/30", "PACS", "127.0.0.5", "rejected"),
    ("*", "PACS", "127.0.0.5", "ok"),  # this AE title from anywhere, on purpose
    ("*", "OTHER", "127.0.0.5", "rejected"),
])
def test_peer_is_admitted_by_ae_title_and_source_address(
        tmp_path: Path, host: str, calling: str, source: str, expected: str) -> None:
    node = Node(tmp_path, policy([AllowedPeer("PACS", host)]))
    try:
        assert echo(node.port, calling=calling, source=source) == expected
    finally:
        node.close()


@needs_aliases
def test_no_peers_refuses_everyone_unless_any_peer_is_opted_in(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    node = Node(tmp_path / "a", policy_from_config(load_config(config, environ={})))
    try:
        assert echo(node.port, source="127.0.0.2") == "rejected"
        assert echo(node.port, source="127.0.0.1") == "rejected"
    finally:
        node.close()
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\naccept_any_peer = true\n')
    node = Node(tmp_path / "b", policy_from_config(load_config(config, environ={})))
    try:
        assert echo(node.port, calling="ANYONE", source="127.0.0.2") == "ok"
    finally:
        node.close()


# ------------------------------------------------------------------- 8: signals


def _spray_signals(proc: subprocess.Popen, seconds: float) -> int:
    """SIGTERM and SIGINT, alternating, as fast as they go, until the process has exited or
    ``seconds`` have passed; how many were sent."""
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        for _ in range(50):
            try:
                os.kill(proc.pid, signal.SIGTERM if sent % 2 == 0 else signal.SIGINT)
            except ProcessLookupError:
                return sent
            sent += 1
    return sent


# Fault injection for the node subprocess: an Event.set() called from a signal handler
# (a caller with a `signum` argument) holds the Event's lock for 0.5 s, so a second signal
# arriving meanwhile runs its handler inside that lock, as the campaign's two quick SIGTERMs
# did by chance; this makes the window certain. Handlers that take no lock are unaffected.
_SLOW_EVENT_SET = """
import sys, threading, time
_set = threading.Event.set
def _slow_set(self):
    if "signum" in sys._getframe(1).f_locals:
        with self._cond:
            time.sleep(0.5)
    _set(self)
threading.Event.set = _slow_set
"""


def _stop_with_signals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, inject: bool,
                       send) -> tuple[int | None, str, float]:
    if inject:
        site = tmp_path / "inject"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_SLOW_EVENT_SET)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    port = free_port()
    config = write_config(tmp_path / "node.toml", data_dir=tmp_path / "data", port=port,
                          peers=[PACS], models=NO_MODELS)
    log = tmp_path / "node.log"
    with node_process(config, "run", log_path=log, port=port) as node:
        wait_for(lambda: "event=listening" in log.read_text(), 60, "node listening")
        started = time.monotonic()
        send(node)
        try:
            code = node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            code = None  # node_process's exit SIGKILLs it
        elapsed = time.monotonic() - started
    return code, log.read_text(), elapsed


def _assert_stopped(code: int | None, text: str) -> None:
    assert code is not None, "the node ignored SIGTERM/SIGINT for 20 s (deadlocked)"
    if code == 0:
        assert "event=signal" in text  # the first signal, logged by the main loop
    else:  # a second signal during shutdown: forced, and it says so
        assert code in (128 + signal.SIGTERM, 128 + signal.SIGINT), text[-2000:]
        assert "event=forced_exit" in text, text[-2000:]


@pytest.mark.slow
def test_second_sigterm_inside_the_first_ones_handler_cannot_deadlock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def two_quick_sigterms(node: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            if node.poll() is None:
                node.send_signal(sig)
                time.sleep(0.15)

    code, text, elapsed = _stop_with_signals(tmp_path, monkeypatch, inject=True,
                                             send=two_quick_sigterms)
    _assert_stopped(code, text)
    assert code == 128 + signal.SIGTERM  # the second signal forced the exit
    print(f"\ntwo SIGTERMs: node exited {code} after {elapsed:.1f} s")


@pytest.mark.slow
def test_bursts_of_sigterm_and_sigint_stop_the_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = []
    code, text, elapsed = _stop_with_signals(
        tmp_path, monkeypatch, inject=False, send=lambda pid: sent.append(
            _spray_signals(pid, 3.0)))
    _assert_stopped(code, text)
    print(f"\nsignal burst: {sent[0]} sent, node exited {code} after {elapsed:.1f} s")


@pytest.mark.slow
def test_one_sigterm_stops_the_node_cleanly(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "node.toml", data_dir=tmp_path / "data", port=port,
                          peers=[PACS], models=NO_MODELS)
    log = tmp_path / "node.log"
    with node_process(config, "run", log_path=log, port=port) as node:
        wait_for(lambda: "event=listening" in log.read_text(), 60, "node listening")
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=30) == 0
    assert "event=forced_exit" not in log.read_text()
