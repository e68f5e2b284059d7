"""Typed configuration: built-in defaults, then a TOML file, then DICOMNODE_<SECTION>_<KEY>
environment variables, then CLI flags (applied by the commands themselves)."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.errors import ConfigError
from gmic.classes import CLASS_NAMES


@dataclass
class TLSConfig:
    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = True


@dataclass
class NodeConfig:
    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    data_dir: str = "./dicomnode-data"
    max_associations: int = 16
    idle_seconds: float = 30.0
    # Storage SOP classes that are not breast images: "reject" (C-STORE 0x0122) or "store"
    # (archived and acknowledged, never processed).
    other_storage: str = "reject"
    tls: TLSConfig | None = None
    # Who may associate: by default only the [[peers]] (calling AE title AND source address);
    # true admits any calling AE from any address (a test bench, never a hospital network).
    accept_any_peer: bool = False
    # A connection must deliver its complete A-ASSOCIATE-RQ (and finish its TLS handshake)
    # within this many seconds of being accepted, else it is closed.
    association_request_seconds: float = 10.0
    # Connections accepted but not yet associated: at most this many from addresses that are
    # not a configured peer's (configured peers' addresses have as many again of their own),
    # and at most max_pending_per_address from any one such address; more are closed at once.
    max_pending_connections: int = 32
    max_pending_per_address: int = 4
    # Largest A-ASSOCIATE-RQ PDU read (bytes); a larger one closes the connection unread.
    max_request_pdu_bytes: int = 262144
    # Maximum PDU length the node announces and accepts once associated (bytes); a PDU
    # announcing more aborts the association before it is read.
    max_pdu_bytes: int = 4194304
    # An association with no PDU for this long is aborted (frees its max_associations slot).
    association_idle_seconds: float = 60.0


@dataclass
class PeerConfig:
    ae_title: str
    host: str = "127.0.0.1"
    port: int = 104
    send_results: bool = True
    # Study complete after this long without a new instance from this peer (else node's).
    idle_seconds: float | None = None
    # After sending results, ask this peer to commit them (Storage Commitment Push Model);
    # its N-EVENT-REPORT comes back to the node's SCP, and retention keeps the sources until
    # every result is committed.
    storage_commitment: bool = False
    # `dicomnode retrieve` may fetch studies from this peer (C-FIND, then C-GET or C-MOVE;
    # or QIDO-RS, then WADO-RS).
    retrieve: bool = False
    # How: "get" (C-GET on one association), "move" (C-MOVE to the node's AE title; the
    # peer must know the node's AE, host and port) or "wado" (QIDO-RS and WADO-RS from
    # dicomweb_url, with token and the TLS settings below). Empty: "wado" where the peer has
    # a dicomweb_url, else "get".
    retrieve_method: str = ""
    # DICOMweb in (STOW-RS to [dicomweb] listen): a request whose bearer token hashes to this
    # (sha256, hex; `dicomnode dicomweb hash-token`) or whose TLS client certificate has this
    # Common Name is this peer's: its instances carry ae_title as their calling AE.
    token_sha256: str = ""
    tls_common_name: str = ""
    # DICOMweb out: results go by STOW-RS to this base URL (e.g. "https://pacs/dicom-web")
    # instead of C-STORE to host:port, with this bearer token (empty: none), trusting this
    # CA file for https (empty: the system's), with this client certificate and key (mTLS).
    dicomweb_url: str = ""
    token: str = ""
    dicomweb_ca: str = ""
    dicomweb_cert: str = ""
    dicomweb_key: str = ""


@dataclass
class DatabaseConfig:
    # Empty means: a SQLite file in node.data_dir.
    url: str = ""


@dataclass
class StorageConfig:
    # What to do when an instance is re-sent with different content: "replace" or "keep_first".
    on_resend: str = "replace"
    # Refuse new instances (C-STORE 0xA700) below this much free disk.
    min_free_mb: int = 1024
    # Delete archived studies older than this; 0 keeps everything. The workers apply it when
    # they start and then every retention_interval_minutes.
    retention_days: int = 0
    retention_interval_minutes: float = 60.0
    # Claims of a job (including ones whose worker died) before it is marked failed.
    job_max_attempts: int = 3


@dataclass
class DeliveryConfig:
    max_attempts: int = 8
    backoff_initial_seconds: float = 5.0
    backoff_max_seconds: float = 600.0


@dataclass
class ModelConfig:
    device: str = "auto"
    dbt: str = "builtin"
    ffdm: str = "builtin"
    s2d: str = "builtin"
    # Test-time augmentation (paper V-D.3): each image's scores are the mean over this many
    # copies shifted and resized at random (the paper used 10; each copy is one more forward
    # pass). 0: one plain pass. Saliency maps and attended regions come from the plain pass.
    test_time_augmentations: int = 0
    # Largest shift/resize of a copy in model-input pixels: the paper's 100 px were for its
    # 2116-px-high input; 24 is what the built-in weights (448-px input) were trained with.
    augment_px: int = 24
    # Read the whole breast: where the breast crop is larger than the checkpoint's input size
    # (a full-size study and the built-in 448x320 weights), the input window grows to the
    # crop rounded up to the network's stride (64), instead of a window of the input size at
    # the chest wall that never looks at the rest. Costs time and memory in proportion.
    whole_breast: bool = True


@dataclass
class WorkerConfig:
    lease_seconds: float = 300.0  # a worker that stops renewing loses its job after this
    poll_seconds: float = 1.0  # how often an idle worker looks for jobs and due deliveries
    # Threads that build a breast's result objects while the next breast's images are
    # analysed. 0 builds them after the last image (lowest peak memory); more than 1 helps
    # only where cores are spare (a GPU host), each holding about 2 GB for a full-size DBT.
    result_threads: int = 1


@dataclass
class ResultsConfig:
    # Saliency above these values is drawn in the BINARY SEG (per class).
    benign_operating_point: float = 0.5
    malignant_operating_point: float = 0.5
    # "binary" (displayed by OHIF and most viewers) or "fractional" (probabilities).
    segmentation: str = "binary"
    # Largest pixel array of one SEG or Parametric Map: above it the result's pixel grid is
    # a coarser integer multiple of the source's (same frames and frame of reference).
    # OHIF (3.13) shows a map only on the source's own grid, so the default keeps a full-size
    # DBT at source resolution (a float32 map of 70 slices of 2080x1750 is 1 GB).
    max_array_mb: int = 2048
    # A Mammography CAD SR (TID 4000) per study with DBT images, marks on the DBT slices.
    cad_sr: bool = True
    # Its operating points: thresholds on the malignant saliency, the most specific
    # (highest) first. A region whose peak reaches the n-th is marked at operating point n;
    # the last is the floor: nothing below it is marked.
    cad_operating_points: list[float] = field(default_factory=lambda: [0.5, 0.35, 0.25])
    # Marks at this operating point or a more specific one are "Presentation Required"
    # (a workstation draws them); the others "Presentation Optional".
    cad_presentation_required: int = 1
    # Which saliency maps go back as Parametric Maps: "malignant" (default: the map a
    # reader acts on), "benign,malignant", or "none" (docs/viewer.md).
    parametric_maps: str = "malignant"
    # "float": float32 saliency on 256 levels (OHIF 3.13 shows only values in 0..1);
    # "integer": 16-bit levels 0..255 with a Real World Value Mapping (1/255).
    map_values: str = "float"
    # Parametric Maps and SEGs in the Deflated Explicit VR Little Endian transfer syntax
    # (lossless; a few % of their size). The SCU sends them uncompressed to a peer that
    # does not accept deflate.
    deflate: bool = True
    # zlib level of that deflate, 1 (fastest) to 9 (smallest). 6 (zlib's default) keeps a
    # study's results within 5% of its bytes, what a PACS stores for good; 1 deflates a
    # full-size DBT view's 1 GB map about 2.3x faster into about 3x the bytes
    # (`dicomnode bench results` measures both); the dataset is the same.
    deflate_level: int = 6

    @property
    def pmap_classes(self) -> tuple[str, ...]:
        value = self.parametric_maps.strip().lower()
        if value in ("", "none"):
            return ()
        return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass
class HTTPConfig:
    listen: str = ""


@dataclass
class DicomwebConfig:
    # STOW-RS receiver (POST /studies, POST /studies/{study}). Off when empty; "host:port"
    # (":port" or "port": loopback). Every request must authenticate: a bearer token of a
    # peer (token_sha256) or, with [dicomweb.tls] require_client_cert, a client certificate
    # whose Common Name is a peer's tls_common_name.
    listen: str = ""
    # A request body larger than this is refused with 413.
    max_body_mb: int = 4096
    # Requests served at once; more get 503 with Retry-After.
    max_requests: int = 8
    tls: TLSConfig | None = None


@dataclass
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    peers: list[PeerConfig] = field(default_factory=list)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    dicomweb: DicomwebConfig = field(default_factory=DicomwebConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.data_path / 'dicomnode.db').as_posix()}"


def _coerce(value: object, target: object, where: str) -> object:
    """Check a TOML or environment value against a dataclass field type."""
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                         "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif target is str:
        if isinstance(value, str):
            return value
    raise ConfigError(
        f"{where}: expected {getattr(target, '__name__', target)}, got {value!r}; fix the value"
    )


def _build(cls: type, table: dict, where: str) -> object:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in table.items():
        kwargs[name] = _field_value(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _field_value(hint: object, value: object, where: str) -> object:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is list and args and args[0] in (float, int, str):  # an array of values
        if isinstance(value, str):  # environment: comma-separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array of tables")
        return [_build(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if args and type(None) in args:  # Optional[dataclass]
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _field_value(inner, value, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, typing.cast(dict, value), where)   # _build checks it is a table
    return _coerce(value, hint, where)


def _apply_environment(config: Config, environ: typing.Mapping[str, str]) -> None:
    """DICOMNODE_<SECTION>_<KEY> overrides scalar keys, e.g. DICOMNODE_NODE_PORT=11113."""
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            var = f"DICOMNODE_{section.name}_{f.name}".upper()
            if var in environ and not dataclasses.is_dataclass(hints[f.name]):
                setattr(obj, f.name, _field_value(hints[f.name], environ[var], var))


def check_cad_operating_points(points: tuple[float, ...] | list[float], required: int) -> None:
    """Raise ValueError unless the CAD operating points are thresholds in (0, 1), strictly
    decreasing (most specific first), and `required` is one of them (1-based)."""
    values = list(points)
    if not values or not all(0.0 < v < 1.0 for v in values) \
            or any(a <= b for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"CAD operating points must be saliency thresholds in (0, 1), the "
                         f"most specific (highest) first, got {values!r}")
    if not 1 <= required <= len(values):
        raise ValueError(f"the operating point marks are Presentation Required at must be "
                         f"1 to {len(values)}, got {required!r}")


def validate(config: Config) -> None:
    if config.storage.on_resend not in ("replace", "keep_first"):
        raise ConfigError(
            f"storage.on_resend: {config.storage.on_resend!r} is not one of replace, keep_first"
        )
    if config.storage.retention_days < 0 or config.storage.retention_interval_minutes <= 0:
        raise ConfigError("storage.retention_days must be 0 (keep all) or more, and "
                          "storage.retention_interval_minutes above 0")
    if config.node.other_storage not in ("reject", "store"):
        raise ConfigError(
            f"node.other_storage: {config.node.other_storage!r} is not one of reject, store")
    unknown = [c for c in config.results.pmap_classes if c not in CLASS_NAMES]
    if unknown:
        raise ConfigError(f"results.parametric_maps: {', '.join(unknown)} is not one of "
                          "benign, malignant (comma-separated), none")
    if config.results.map_values not in ("float", "integer"):
        raise ConfigError(f"results.map_values: {config.results.map_values!r} is not one of "
                          "float, integer")
    if not isinstance(config.results.deflate_level, int) or \
            not 1 <= config.results.deflate_level <= 9:
        raise ConfigError(f"results.deflate_level: {config.results.deflate_level!r} is not "
                          "an integer from 1 to 9")
    if config.results.segmentation not in ("binary", "fractional"):
        raise ConfigError(f"results.segmentation: {config.results.segmentation!r} is not one "
                          "of binary, fractional")
    try:
        check_cad_operating_points(config.results.cad_operating_points,
                                   config.results.cad_presentation_required)
    except ValueError as exc:
        raise ConfigError(f"results.cad_operating_points / cad_presentation_required: {exc}; "
                          "fix them") from None
    if config.worker.result_threads < 0:
        raise ConfigError(f"worker.result_threads: {config.worker.result_threads} is negative; "
                          "use 0 (build after the model) or more")
    for key in ("test_time_augmentations", "augment_px"):
        if getattr(config.model, key) < 0:
            raise ConfigError(f"model.{key}: {getattr(config.model, key)} is negative; use 0 "
                              "(off) or more")
    for peer in config.peers:
        if peer.retrieve_method not in ("", "get", "move", "wado"):
            raise ConfigError(f"peers {peer.ae_title}: retrieve_method "
                              f"{peer.retrieve_method!r} is not one of get, move, wado")
        if peer.retrieve_method == "wado" and not peer.dicomweb_url:
            raise ConfigError(f"peers {peer.ae_title}: retrieve_method \"wado\" needs the "
                              "peer's dicomweb_url (its DICOMweb base URL)")
    if not 0 <= config.node.port <= 65535:
        raise ConfigError(f"node.port: {config.node.port} is not a TCP port "
                          "(1-65535, or 0 for any free port)")
    if not 1 <= len(config.node.ae_title) <= 16:
        raise ConfigError("node.ae_title: an AE title has 1 to 16 characters")
    _validate_dicomweb(config)
    _validate_network_limits(config)


def _validate_dicomweb(config: Config) -> None:
    import re

    if config.dicomweb.max_body_mb < 1 or config.dicomweb.max_requests < 1:
        raise ConfigError("dicomweb.max_body_mb and dicomweb.max_requests must be at least 1")
    for i, peer in enumerate(config.peers):
        where = f"peers[{i}] ({peer.ae_title})"
        if peer.token_sha256 and not re.fullmatch(r"[0-9a-f]{64}", peer.token_sha256.lower()):
            raise ConfigError(f"{where}.token_sha256: expected 64 hex digits (the sha256 of "
                              "the token: `dicomnode dicomweb hash-token`)")
        if peer.dicomweb_url and not peer.dicomweb_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.dicomweb_url: {peer.dicomweb_url!r} is not an http:// "
                              "or https:// URL")
        if bool(peer.dicomweb_cert) != bool(peer.dicomweb_key):
            raise ConfigError(f"{where}: dicomweb_cert and dicomweb_key go together")
    if config.dicomweb.listen:
        tls = config.dicomweb.tls
        mtls = tls is not None and tls.require_client_cert
        if not any(p.token_sha256 for p in config.peers) and not mtls:
            raise ConfigError("[dicomweb] listen is set but nothing can authenticate: give a "
                              "peer token_sha256, or [dicomweb.tls] with require_client_cert")


def _validate_network_limits(config: Config) -> None:
    import ipaddress

    node = config.node
    for key in ("association_request_seconds", "association_idle_seconds", "max_associations",
                "max_pending_connections", "max_pending_per_address"):
        if getattr(node, key) <= 0:
            raise ConfigError(f"node.{key}: {getattr(node, key)} must be above 0")
    if not 4096 <= node.max_request_pdu_bytes <= 2**24:
        raise ConfigError(f"node.max_request_pdu_bytes: {node.max_request_pdu_bytes} is not "
                          "between 4096 and 16777216")
    if not 16384 <= node.max_pdu_bytes <= 2**28:
        raise ConfigError(f"node.max_pdu_bytes: {node.max_pdu_bytes} is not between 16384 and "
                          "268435456")
    for i, peer in enumerate(config.peers):
        if "/" in peer.host:
            try:
                ipaddress.ip_network(peer.host, strict=False)
            except ValueError:
                raise ConfigError(f"peers[{i}].host: {peer.host!r} is not a CIDR range (e.g. "
                                  "10.1.2.0/24); use an address, a range, a host name or "
                                  "\"*\"") from None


def load_config(path: str | os.PathLike | None = None,
                environ: typing.Mapping[str, str] | None = None) -> Config:
    """Load the configuration: defaults, then the file (or $DICOMNODE_CONFIG), then environment."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("DICOMNODE_CONFIG") or None
    if path is None:
        config = Config()
    else:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass an existing --config "
                              "file or unset DICOMNODE_CONFIG") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix it") from None
        config = typing.cast(Config, _build(Config, table, str(path)))
    _apply_environment(config, environ)
    validate(config)
    return config
