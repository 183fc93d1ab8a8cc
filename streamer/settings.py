"""One typed, frozen settings object, read once at start and passed down.

Precedence, highest first: CLI flags > env vars > config file (YAML or TOML) > defaults, so a
checked-in file holds the deployment's shape and env/flags override one thing at a time. The
layering is pydantic-settings' own (``CliSettingsSource``, ``YamlConfigSettingsSource``,
``TomlConfigSettingsSource``, ``settings_customise_sources``); this module only picks the
file (``--config`` / ``<PREFIX>CONFIG``) and turns every bad value, whichever source it came
from, into a ``ConfigError`` that names the field and how to set it. The helpers are generic
over ``LayeredSettings`` so the trainer reuses them for ``TrainerSettings`` (prefix
``TRAINER_``).

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, StreamerSettings)
    settings = settings_from_args(StreamerSettings, parser.parse_args())
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from streamer.errors import ConfigError

S = TypeVar("S", bound="LayeredSettings")

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml")


class FieldProblem(ValueError):
    """Raised by cross-field validators so the ConfigError names the field to fix.

    A plain ValueError from a model validator carries no field, and "invalid setting
    'settings'" tells the operator nothing.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def split_host_port(address: str) -> tuple[str, int]:
    """Parse "host:port" ("[v6]:port" too); an empty host means every interface."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep:
        raise ValueError(f"expected host:port such as 0.0.0.0:9108, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0..65535")
    return host or "0.0.0.0", port


class LayeredSettings(BaseSettings):
    """Flags > env > config file > defaults; ``config`` names the YAML/TOML file."""

    config: Path | None = Field(
        None, description="YAML or TOML settings file, below env vars and flags"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The CLI source, when given, goes first (pydantic-settings puts it there).
        return init_settings, env_settings, ConfigFileSource(settings_cls)


class KafkaClientSettings(LayeredSettings):
    """What every process that talks to Kafka shares: security and logging. Subclasses set
    their own env prefix (STREAMER_, TRAINER_), which applies to these fields too."""

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol"
    )
    ssl_cafile: Path | None = Field(
        None, description="PEM file of the CA(s) that signed the brokers' certificates"
    )
    ssl_certfile: Path | None = Field(
        None, description="PEM client certificate (chain) for mutual TLS"
    )
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile")
    ssl_key_password: SecretStr | None = Field(
        None, description="password of an encrypted ssl_keyfile"
    )
    ssl_check_hostname: bool = Field(
        True, description="verify that the broker certificate matches its host name"
    )
    sasl_mechanism: Literal[
        "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"
    ] | None = Field(None, description="SASL mechanism (with a SASL_* security_protocol)")
    sasl_username: str | None = Field(
        None, description="SASL username (PLAIN, SCRAM-SHA-256/512)"
    )
    sasl_password: SecretStr | None = Field(
        None, description="SASL password; prefer the env var, flags show up in ps"
    )
    sasl_oauth_token_url: str | None = Field(
        None, description="OAUTHBEARER: OAuth 2.0 token endpoint (client-credentials grant)"
    )
    sasl_oauth_client_id: str | None = Field(None, description="OAUTHBEARER: client id")
    sasl_oauth_client_secret: SecretStr | None = Field(
        None, description="OAUTHBEARER: client secret"
    )
    sasl_oauth_scope: str | None = Field(None, description="OAUTHBEARER: requested scope")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="log level"
    )

    @field_validator("security_protocol", "sasl_mechanism", "log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @model_validator(mode="after")
    def _security_consistent(self) -> KafkaClientSettings:
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and self.sasl_mechanism is None:
            raise FieldProblem("sasl_mechanism", f"{self.security_protocol} needs a mechanism")
        if not sasl and self.sasl_mechanism is not None:
            raise FieldProblem("security_protocol",
                               f"sasl_mechanism {self.sasl_mechanism} needs SASL_SSL or "
                               f"SASL_PLAINTEXT, not {self.security_protocol}")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            for name in ("sasl_username", "sasl_password"):
                if getattr(self, name) is None:
                    raise FieldProblem(name, f"{self.sasl_mechanism} needs {name}")
        if self.sasl_mechanism == "OAUTHBEARER":
            for name in ("sasl_oauth_token_url", "sasl_oauth_client_id",
                         "sasl_oauth_client_secret"):
                if getattr(self, name) is None:
                    raise FieldProblem(name, f"OAUTHBEARER needs {name}")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise FieldProblem("ssl_certfile", "ssl_keyfile is set without ssl_certfile")
        return self

    def kafka_security_kwargs(self) -> dict[str, Any]:
        """kafka-python keyword arguments (consumer and producer alike) for whatever security
        settings are set. Secrets appear only here, as the client needs them."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_check_hostname"] = self.ssl_check_hostname
            for name, value in (("ssl_cafile", self.ssl_cafile),
                                ("ssl_certfile", self.ssl_certfile),
                                ("ssl_keyfile", self.ssl_keyfile)):
                if value is not None:
                    kwargs[name] = str(value)
            if self.ssl_key_password is not None:
                kwargs["ssl_password"] = self.ssl_key_password.get_secret_value()
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            kwargs["sasl_plain_username"] = self.sasl_username
        if self.sasl_password is not None:
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.sasl_mechanism == "OAUTHBEARER":
            from streamer.oauth import ClientCredentialsTokenProvider

            assert self.sasl_oauth_token_url and self.sasl_oauth_client_id
            assert self.sasl_oauth_client_secret is not None
            kwargs["sasl_oauth_token_provider"] = ClientCredentialsTokenProvider(
                self.sasl_oauth_token_url, self.sasl_oauth_client_id,
                self.sasl_oauth_client_secret, self.sasl_oauth_scope,
            )
        return kwargs


class StreamerSettings(KafkaClientSettings):
    """Everything the streamer process can be told; see ``streamer run --help``."""

    model_config = SettingsConfigDict(env_prefix="STREAMER_", frozen=True, extra="forbid")

    bootstrap_servers: str = Field(
        "localhost:9092", min_length=1, description="Kafka bootstrap servers, comma-separated"
    )
    input_topic: str = Field("events", min_length=1, description="topic to read events from")
    output_topic: str = Field(
        "predictions", min_length=1, description="topic to write predictions to"
    )
    dlq_topic: str | None = Field(
        None, min_length=1, description="dead-letter topic; unset means <input_topic>.dlq"
    )
    group_id: str = Field("streamer", min_length=1, description="Kafka consumer group id")
    model: Path = Field(
        Path("models"), description="model artifact directory or model registry root"
    )
    model_name: str = Field("default", min_length=1, description="model name in the registry")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where model and key state live; auto picks cuda when present"
    )
    cuda_graphs: bool = Field(
        False, description="on CUDA, replay the engine step as CUDA graphs at bucketed batch "
        "sizes (opt-in; ignored on the CPU)"
    )
    max_batch_events: int = Field(2048, gt=0, description="most events per engine step")
    max_batch_wait_ms: int = Field(
        5, ge=0, description="longest wait to fill a batch before stepping"
    )
    fetch_max_wait_ms: int = Field(
        10, ge=0, description="broker-side fetch wait (kafka fetch_max_wait_ms)"
    )
    kafka_client: Literal["kafka-python", "confluent"] = Field(
        "kafka-python", description="Kafka client library of the edge (confluent: librdkafka)"
    )
    capacity: int = Field(100_000, gt=0, description="key slots preallocated for LSTM state")
    key_ttl_s: float | None = Field(
        None, gt=0, description="evict keys idle this long; unset evicts only for capacity"
    )
    window: int = Field(
        32, ge=1, description="recent feature vectors kept per key to re-warm state on a swap"
    )
    swap_policy: Literal["rewarm", "reset", "keep"] = Field(
        "rewarm", description="what a model swap does to per-key state"
    )
    registry_poll_s: float = Field(
        5.0, gt=0, description="seconds between checks for a new model version"
    )
    metrics_address: str = Field(
        "0.0.0.0:9108", description="host:port serving /metrics /healthz /readyz"
    )
    max_future_s: float = Field(
        300, gt=0, description="events stamped further ahead than this are dead-lettered"
    )
    max_past_s: float | None = Field(
        None, gt=0,
        description="events stamped further back than this are dead-lettered; unset: no bound",
    )
    min_event_time: float = Field(
        946_684_800.0,
        description="events stamped before this epoch second are dead-lettered (2000-01-01)",
    )
    max_key_bytes: int = Field(
        4096, gt=0, description="events whose key is longer (UTF-8 bytes) are dead-lettered"
    )
    max_request_size: int = Field(
        1_048_576, ge=65_536,
        description="largest record the producer sends (bytes); bigger dead letters are "
                    "truncated; keep at or below the topics' max.message.bytes",
    )
    output_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="compression of produced predictions and dead letters"
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a group with no committed offset starts"
    )
    lag_interval_s: float = Field(
        5.0, gt=0, description="seconds between consumer-lag measurements"
    )
    # Consumer group membership and fault handling (see README "Consumer group and faults").
    partition_assignor: Literal["sticky", "range", "roundrobin"] = Field(
        "sticky", description="partition assignment strategy of the consumer group"
    )
    group_instance_id: str | None = Field(
        None, min_length=1,
        description="static group membership id (one per replica, e.g. the pod name); a "
        "restart within session_timeout_ms keeps its partitions without a rebalance",
    )
    session_timeout_ms: int = Field(
        10_000, ge=1000, description="a member silent this long is removed from the group"
    )
    heartbeat_interval_ms: int = Field(
        3_000, ge=100, description="group heartbeat period; below session_timeout_ms / 3"
    )
    max_poll_interval_ms: int = Field(
        60_000, ge=1000,
        description="longest gap between polls before the member leaves the group; also "
        "the rebalance timeout",
    )
    request_timeout_ms: int = Field(
        30_000, ge=1000, description="Kafka request timeout; above session_timeout_ms"
    )
    isolation_level: Literal["read_committed", "read_uncommitted"] = Field(
        "read_committed",
        description="read_committed skips aborted and open transactions of the input topic",
    )
    check_crcs: bool = Field(
        True, description="verify record-batch CRCs (off only for brokers that write none)"
    )
    flush_timeout_s: float = Field(
        30.0, gt=0,
        description="longest wait for a batch's outputs to be acknowledged before the batch "
        "is re-delivered",
    )
    commit_timeout_s: float = Field(5.0, gt=0, description="longest wait for an offset commit")
    drain_timeout_s: float = Field(
        20.0, gt=0,
        description="on SIGTERM, longest time to flush, commit and leave the group",
    )
    retry_backoff_max_s: float = Field(
        5.0, gt=0, description="longest pause between retries while Kafka is unavailable"
    )
    # Durable per-key state (see README "Guarantees").
    changelog: bool = Field(
        False, description="checkpoint per-key state to a changelog topic and restore it on "
        "start and on every assignment"
    )
    changelog_topic: str | None = Field(
        None, min_length=1, description="changelog topic, co-partitioned with the input; "
        "unset means <group_id>-state"
    )
    checkpoint_interval_s: float | None = Field(
        5.0, gt=0, description="seconds between checkpoints (and offset commits) with changelog"
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="exactly_once: predictions, dead letters, changelog and "
        "input offsets commit in one Kafka transaction per checkpoint (needs changelog)"
    )
    transactional_id: str | None = Field(
        None, min_length=1, description="exactly_once: producer transactional id, stable per "
        "replica (e.g. the pod name) so a restart aborts its predecessor's open transaction; "
        "unset: group_instance_id, else <group_id>-<random> (see README Guarantees)"
    )
    checkpoint_interval_events: int | None = Field(
        None, gt=0, description="events between checkpoints with changelog; unset: by time only"
    )

    @field_validator("metrics_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        host, port = split_host_port(value)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @model_validator(mode="after")
    def _batch_fits(self) -> StreamerSettings:
        if self.max_batch_events > self.capacity:
            raise FieldProblem(
                "max_batch_events",
                f"{self.max_batch_events} exceeds capacity ({self.capacity}); "
                "a batch can never hold more keys than there are slots",
            )
        return self

    @model_validator(mode="after")
    def _group_timeouts(self) -> StreamerSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise FieldProblem(
                "heartbeat_interval_ms",
                f"{self.heartbeat_interval_ms} ms is more than a third of session_timeout_ms "
                f"({self.session_timeout_ms} ms); the group would drop this member",
            )
        if self.request_timeout_ms <= self.session_timeout_ms:
            raise FieldProblem(
                "request_timeout_ms",
                f"{self.request_timeout_ms} ms must exceed session_timeout_ms "
                f"({self.session_timeout_ms} ms): a JoinGroup may wait that long",
            )
        return self

    @model_validator(mode="after")
    def _exactly_once_needs_state(self) -> StreamerSettings:
        if self.processing_guarantee == "exactly_once" and not self.changelog:
            raise FieldProblem("processing_guarantee", "exactly_once needs changelog = true: "
                               "the state must commit in the same transaction as the outputs")
        if self.processing_guarantee == "exactly_once" and (
                self.isolation_level != "read_committed"):
            raise FieldProblem("isolation_level", "exactly_once reads read_committed only")
        return self

    @property
    def state_topic(self) -> str:
        return self.changelog_topic or f"{self.group_id}-state"

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.input_topic}.dlq"

    @property
    def metrics_host(self) -> str:
        return split_host_port(self.metrics_address)[0]

    @property
    def metrics_port(self) -> int:
        return split_host_port(self.metrics_address)[1]



# --- loading ---------------------------------------------------------------------------


class ConfigFileSource(PydanticBaseSettingsSource):
    """The YAML or TOML file that the sources above named in ``config``; dashes in keys
    read as underscores, unknown keys are refused, not ignored."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        config = self.current_state.get("config")
        if config is None:
            return {}
        return read_config_file(self.settings_cls, Path(config))


def read_config_file(cls: type[BaseSettings], path: Path) -> dict[str, Any]:
    """Field values from a YAML/TOML mapping, read by pydantic-settings' file sources."""
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(
            "config", f"{path}: unsupported config file type {suffix or '(none)'!r}; "
            f"use one of {', '.join(CONFIG_SUFFIXES)}"
        )
    if not path.is_file():  # the library's sources skip a missing file silently
        raise ConfigError(
            "config", f"cannot read config file {path} (flag --config, env {env_prefix(cls)}CONFIG)"
        )
    try:
        if suffix == ".toml":
            data = TomlConfigSettingsSource(cls, toml_file=path).toml_data
        else:
            data = YamlConfigSettingsSource(cls, yaml_file=path).yaml_data
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("config", f"cannot parse config file {path}: {exc}") from exc
    except (AttributeError, TypeError, ValueError) as exc:  # a list or scalar, not a mapping
        raise ConfigError(
            "config", f"{path} must hold a mapping of setting names to values"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of setting names to values")
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    for key in values:
        if key not in cls.model_fields or key == "config":
            raise ConfigError(key, f"unknown key in config file {path}{_suggest(cls, key)}")
    return values


def load_settings(
    cls: type[S], overrides: Mapping[str, Any] | None = None, config_file: Path | None = None,
    cli_source: CliSettingsSource[Any] | None = None,
    how_to_set: Callable[[str], str] | None = None,
) -> S:
    """Build ``cls`` from defaults < config file < env < ``overrides`` < ``cli_source``.

    ``config_file`` falls back to env ``<PREFIX>CONFIG``. Raises ConfigError on any bad value;
    its message ends with how to set the field: ``how_to_set(field)`` when given (a command
    with its own way, e.g. ``streamer bench --set``), else the env var and the flag.
    """
    values = dict(overrides or {})
    if config_file is not None:
        values["config"] = config_file
    try:
        return cls(_cli_settings_source=cli_source, **values)
    except ValidationError as exc:
        raise _config_error(cls, exc, how_to_set) from exc


def _config_error(cls: type[BaseSettings], exc: ValidationError,
                  how_to_set: Callable[[str], str] | None = None) -> ConfigError:
    how = how_to_set or (lambda field: _how_to_set(cls, field))
    problems = [_describe(cls, error, how) for error in exc.errors()]
    field, message = problems[0]
    for other_field, other_message in problems[1:]:
        message += f"; also {other_field!r}: {other_message}"
    return ConfigError(field, message)


def _describe(cls: type[BaseSettings], error: Any,
              how: Callable[[str], str]) -> tuple[str, str]:
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldProblem):
        return cause.field, f"{cause} {how(cause.field)}"
    field = str(error["loc"][0]) if error["loc"] else "settings"
    if error["type"] == "extra_forbidden":
        return field, f"unknown setting{_suggest(cls, field)}"
    message = error["msg"].removeprefix("Value error, ")
    info = cls.model_fields.get(field)
    got = f"got {error['input']!r}"
    if info is not None and not _is_secret(info.annotation) and got not in message:
        message += f", {got}"
    return field, f"{message} {how(field) if field in cls.model_fields else ''}".rstrip()


def _how_to_set(cls: type[BaseSettings], field: str) -> str:
    if field not in cls.model_fields:
        return ""
    return f"(env {env_prefix(cls)}{field.upper()}, flag --{field.replace('_', '-')})"


def _suggest(cls: type[BaseSettings], key: str) -> str:
    close = difflib.get_close_matches(key, list(cls.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_secret(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, (SecretStr, SecretBytes)):
        return True
    return any(_is_secret(arg) for arg in get_args(annotation))


def env_prefix(cls: type[BaseSettings]) -> str:
    return str(cls.model_config.get("env_prefix") or "")


# --- command line -----------------------------------------------------------------------


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    cls: type[LayeredSettings],
    exclude: Collection[str] = (),
) -> CliSettingsSource[Any]:
    """Add ``--field-name`` per field (``--config`` too) through pydantic-settings'
    ``CliSettingsSource``; help shows each default and env var, only given flags override.

    ``exclude`` hides fields from this parser (a subcommand that never reads them); they stay
    settable by env and file. The source rides along in the namespace for
    ``settings_from_args``.
    """
    shown: type[BaseSettings] = cls
    if exclude:
        fields: dict[str, Any] = {
            name: (info.annotation, info)
            for name, info in cls.model_fields.items() if name not in exclude
        }
        shown = create_model(cls.__name__, __base__=BaseSettings, **fields)
        shown.model_config["env_prefix"] = env_prefix(cls)  # for the help's env var names
    source: CliSettingsSource[Any] = CliSettingsSource(
        shown, root_parser=parser, cli_kebab_case=True, cli_show_env_vars=True,
        cli_implicit_flags=True, cli_hide_none_type=True,
    )
    parser.set_defaults(_settings_source=source)
    return source


def settings_from_args(cls: type[S], ns: argparse.Namespace) -> S:
    """Settings from the flags present in ``ns`` (strings; pydantic coerces them)."""
    source: CliSettingsSource[Any] = ns._settings_source
    return load_settings(cls, cli_source=source(parsed_args=ns))
