from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicomnode.config import Config, load_config
from dicomnode.errors import ConfigError


def test_defaults_need_no_file(tmp_path: Path) -> None:
    config = load_config(None, environ={})
    assert config == Config()
    assert config.database_url.startswith("sqlite:///")
    assert config.database_url.endswith("dicomnode-data/dicomnode.db")


def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\nae_title = "BREASTAI"\nport = 11113\n'
        '[node.tls]\ncert = "c.pem"\nkey = "k.pem"\n'
        '[[peers]]\nae_title = "PACS"\nport = 4242\n'
        '[database]\nurl = "postgresql+psycopg://db/dn"\n'
    )
    config = load_config(path, environ={"DICOMNODE_NODE_PORT": "11114",
                                        "DICOMNODE_MODEL_DEVICE": "cpu"})
    assert config.node.ae_title == "BREASTAI"
    assert config.node.port == 11114  # environment wins over the file
    assert config.node.tls is not None and config.node.tls.cert == "c.pem"
    assert config.peers[0].ae_title == "PACS" and config.peers[0].port == 4242
    assert config.model.device == "cpu"
    assert config.database_url == "postgresql+psycopg://db/dn"


def test_config_from_dicomnode_config_variable(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[node]\nidle_seconds = 5\n')
    assert load_config(None, environ={"DICOMNODE_CONFIG": str(path)}).node.idle_seconds == 5.0


@pytest.mark.parametrize(
    ("text", "env", "fragment"),
    [
        ('[node]\nport = "eleven"\n', {}, "node.port"),
        ('[node]\nprot = 1\n', {}, "unknown key 'prot'"),
        ('[node\n', {}, "not valid TOML"),
        ('[storage]\non_resend = "sometimes"\n', {}, "storage.on_resend"),
        ("", {"DICOMNODE_NODE_PORT": "99999"}, "not a TCP port"),
        ("", {"DICOMNODE_NODE_MAX_ASSOCIATIONS": "many"}, "DICOMNODE_NODE_MAX_ASSOCIATIONS"),
        ('[model]\ntest_time_augmentations = -1\n', {}, "model.test_time_augmentations"),
        ("", {"DICOMNODE_MODEL_AUGMENT_PX": "-3"}, "model.augment_px: -3 is negative"),
        ('[[peers]]\nae_title = "PACS"\nhost = "10.0.0.0/33"\n', {}, "peers[0].host"),
        ("", {"DICOMNODE_NODE_ASSOCIATION_REQUEST_SECONDS": "0"},
         "node.association_request_seconds"),
        ("", {"DICOMNODE_NODE_MAX_PDU_BYTES": "1000"}, "node.max_pdu_bytes"),
        ("", {"DICOMNODE_NODE_ACCEPT_ANY_PEER": "maybe"}, "DICOMNODE_NODE_ACCEPT_ANY_PEER"),
        ('[[peers]]\nae_title = "P"\nretrieve_method = "http"\n', {},
         "is not one of get, move, wado"),
        ('[[peers]]\nae_title = "P"\nretrieve_method = "wado"\n', {},
         'retrieve_method "wado" needs the peer\'s dicomweb_url'),
    ],
)
def test_bad_configuration_is_named(tmp_path: Path, text: str, env: dict, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(path, environ=env)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_cli_prints_one_line_and_exits_2_on_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nport = "x"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "--config", str(path), "jobs", "list"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and "node.port" in lines[0]


def test_cli_help_lists_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "dicomnode.cli", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for name in ("synth", "inspect", "jobs", "db", "bench"):
        assert f"  {name} " in proc.stdout


def test_unknown_command_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "dicomnode.cli", "frobnicate"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "No such command" in proc.stderr


def test_example_deploy_config_loads() -> None:
    example = Path(__file__).resolve().parents[1] / "deploy" / "dicomnode.toml"
    config = load_config(example, environ={})
    assert config.peers[0].ae_title == "PACS"
    assert config.storage.min_free_mb == 1024
    assert config.node.accept_any_peer is False  # only the [[peers]] may send


def test_network_limits_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\naccept_any_peer = true\nassociation_request_seconds = 3\n'
                    'max_pending_connections = 8\n[[peers]]\nae_title = "PACS"\n'
                    'host = "10.1.2.0/24"\n')
    config = load_config(path, environ={"DICOMNODE_NODE_ASSOCIATION_IDLE_SECONDS": "15"})
    assert config.node.accept_any_peer is True
    assert config.node.association_request_seconds == 3.0
    assert config.node.max_pending_connections == 8
    assert config.node.association_idle_seconds == 15.0
    assert config.peers[0].host == "10.1.2.0/24"


def test_cad_operating_points_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[results]\ncad_operating_points = [0.6, 0.4]\n"
                    "cad_presentation_required = 2\n")
    config = load_config(path, environ={})
    assert config.results.cad_operating_points == [0.6, 0.4]
    assert config.results.cad_presentation_required == 2
    config = load_config(path, environ={"DICOMNODE_RESULTS_CAD_OPERATING_POINTS": "0.7, 0.3"})
    assert config.results.cad_operating_points == [0.7, 0.3]
    from dicomnode.pipeline.worker import result_options

    options = result_options(config)
    assert options.cad_operating_points == (0.7, 0.3) and options.cad_presentation_required == 2


def test_deflate_level_reaches_the_result_builders(tmp_path: Path) -> None:
    """The maps and SEG start deflating while the SR is built: at the level the objects are
    written at, or that early work is thrown away."""
    from dicomnode.pipeline.worker import result_options

    path = tmp_path / "node.toml"
    path.write_text("[results]\ndeflate_level = 1\n")
    config = load_config(path, environ={})
    assert config.results.deflate_level == 1
    assert result_options(config).deflate_level == 1


@pytest.mark.parametrize("text", [
    "cad_operating_points = [0.25, 0.5]",  # the most specific must come first
    "cad_operating_points = []",
    "cad_operating_points = [1.5]",
    'cad_operating_points = ["high"]',
    "cad_presentation_required = 4",  # only three operating points by default
])
def test_bad_cad_operating_points_are_named(tmp_path: Path, text: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f"[results]\n{text}\n")
    with pytest.raises(ConfigError, match="cad_"):
        load_config(path, environ={})


def test_result_threads_are_read_and_a_negative_count_is_named(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[worker]\nresult_threads = 0\n")
    assert load_config(path, environ={}).worker.result_threads == 0
    assert load_config(None, environ={}).worker.result_threads == 1
    path.write_text("[worker]\nresult_threads = -1\n")
    with pytest.raises(ConfigError, match=r"worker\.result_threads: -1 is negative"):
        load_config(path, environ={})
