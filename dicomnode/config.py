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


@dataclass
class PeerConfig:
    ae_title: str
    host: str = "127.0.0.1"
    port: int = 104
    send_results: bool = True
    # Study complete after this long without a new instance from this peer (else node's).
    idle_seconds: float | None = None


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
    # Delete archived studies older than this; 0 keeps everything.
    retention_days: int = 0
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


@dataclass
class HTTPConfig:
    listen: str = ""


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
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array of tables")
        return [_build(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if args and type(None) in args:  # Optional[dataclass]
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _field_value(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
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
                setattr(obj, f.name, _coerce(environ[var], hints[f.name], var))


def validate(config: Config) -> None:
    if config.storage.on_resend not in ("replace", "keep_first"):
        raise ConfigError(
            f"storage.on_resend: {config.storage.on_resend!r} is not one of replace, keep_first"
        )
    if config.node.other_storage not in ("reject", "store"):
        raise ConfigError(
            f"node.other_storage: {config.node.other_storage!r} is not one of reject, store")
    if config.results.segmentation not in ("binary", "fractional"):
        raise ConfigError(f"results.segmentation: {config.results.segmentation!r} is not one "
                          "of binary, fractional")
    for key in ("test_time_augmentations", "augment_px"):
        if getattr(config.model, key) < 0:
            raise ConfigError(f"model.{key}: {getattr(config.model, key)} is negative; use 0 "
                              "(off) or more")
    if not 0 <= config.node.port <= 65535:
        raise ConfigError(f"node.port: {config.node.port} is not a TCP port "
                          "(1-65535, or 0 for any free port)")
    if not 1 <= len(config.node.ae_title) <= 16:
        raise ConfigError("node.ae_title: an AE title has 1 to 16 characters")


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
