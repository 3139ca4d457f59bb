"""Service settings: environment variables with the prefix ``GGA_``, read into groups.

``Settings()`` reads the environment when it is constructed (never at import time) and is
passed to ``create_app(settings)``. The values are grouped by what they configure:

==========  ==============================================================================
group       settings (``settings.<group>.<field>``, read from ``GGA_<NAME>``)
==========  ==============================================================================
model       the served classifier and how it is run: ``name`` (``GGA_MODEL``), ``weights``
            (``GGA_MODEL_WEIGHTS``), ``card`` (``GGA_MODEL_CARD``), ``device``, ``strategy``,
            ``torch_threads``, ``alpha`` (``GGA_SERVE_ALPHA``: the served flag's alpha)
server      the HTTP server: ``host``, ``port``, ``log_level``, ``shutdown_grace_s``,
            ``body_timeout_s``, ``guarded_protocol``, ``header_timeout_s``
batching    the queue and the batches: ``max_batch_rows``, ``max_delay_ms``,
            ``max_queue_rows``, ``max_queue_wait_s``, ``request_timeout_s``
limits      what one client may ask for: ``max_concurrent_requests``, ``max_request_bytes``,
            ``max_fit_bytes``, ``max_image_pixels``
auth        ``admin_token``, ``read_token``
fit         new fits: ``preset`` (``GGA_DETECTOR``), ``top_n``, ``alpha`` (``GGA_FIT_ALPHA``),
            ``batch_size`` (``GGA_FIT_BATCH_SIZE``), ``data_dir``
storage     ``artifact_dir``, ``reload_interval_s``
==========  ==============================================================================

The environment names are flat, as they always were; :func:`env_names` maps each to its
group and field. The constructor takes the same flat names in lower case without the
prefix (``Settings(max_batch_rows=8)`` is ``GGA_MAX_BATCH_ROWS=8``), or whole groups
(``Settings(batching=BatchingSettings(...))``). A value that fails validation, alone or
together with another (:meth:`Settings._across_fields`), raises :class:`SettingsError`
naming the variable(s).

``GGA_ALPHA`` (deprecated) used to mean both the served flag's alpha and the default alpha
of new fits; it still sets ``GGA_SERVE_ALPHA`` and ``GGA_FIT_ALPHA`` where those are not
set, with a :class:`DeprecationWarning`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

log = logging.getLogger("service.settings")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
PREFIX = "GGA_"
DEPRECATED_ALPHA = "GGA_ALPHA"


class SettingsError(ValueError):
    """Settings that cannot be served with; the message names each offending ``GGA_*`` variable."""


def _env(name: str) -> dict[str, str]:
    """``json_schema_extra`` of a field whose variable is not ``GGA_<FIELD NAME>``."""
    return {"env": name}


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)


class ModelSettings(_Group):
    name: str = Field(
        "mnist_cnn", json_schema_extra=_env("GGA_MODEL"),
        description="The classifier: a built-in architecture name (mnist_cnn, cifar_resnet20, "
        "cifar_resnet56), 'torchscript:<path>' or 'factory:<package.module>:<function>'. "
        "The default serves the bundled reference MNIST CNN with its fitted detector.",
    )
    weights: Path | None = Field(
        None, json_schema_extra=_env("GGA_MODEL_WEIGHTS"),
        description="safetensors weights (built-in and factory models); the bundled weights for mnist_cnn",
    )
    card: Path | None = Field(
        None, json_schema_extra=_env("GGA_MODEL_CARD"),
        description="model card JSON (input_shape, class_names); default: model_card.json beside the weights, or "
        "the built-in card of the architecture",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    strategy: Literal["auto", "device", "loop", "vmap", "replicate"] = Field(
        "auto", description="how the per-class gradients are computed: auto (each of loop, vmap and replicate "
        "timed at startup at batch sizes 1, 8 and max_batch_rows, the fastest per batch size kept for the "
        "process), device (loop on CPU, vmap on accelerators, no measurement) or one fixed strategy"
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch's default)")
    alpha: float | None = Field(
        None, gt=0, lt=1, json_schema_extra=_env("GGA_SERVE_ALPHA"),
        description="the served flag: a sample is flagged when trust < alpha (None: the served detector's own alpha)",
    )

    @field_validator("name")
    @classmethod
    def _model_spec(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()


class ServerSettings(_Group):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    shutdown_grace_s: float = Field(
        10.0, gt=0, description="on SIGTERM: at once stop admitting (503, /readyz 503) and keep computing the queued "
        "requests; requests still queued shortly before this grace ends get 503; then exit"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="longest silence while the service waits for more of a request body (restarted by "
        "every chunk; not counted while the service is not reading); past it: 408 request_timeout and the "
        "connection closed"
    )
    guarded_protocol: bool = Field(
        False, description="serve with the service's own HTTP protocol (a subclass of uvicorn's h11 protocol, "
        "tested with the uvicorn range the package pins): the header timeout below, and POST /predict refused "
        "before parsing while the queue admits nothing. Off: plain uvicorn; put a proxy with a header timeout "
        "(nginx client_header_timeout) in front"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="with guarded_protocol only: time a client has to send a request's line and "
        "headers, counted from the connection's start (first request) or the request's first byte (later "
        "keep-alive requests), not restarted by each byte; past it: 408 request_timeout and the connection closed"
    )


class BatchingSettings(_Group):
    max_batch_rows: int = Field(64, ge=1, description="rows per compute batch")
    max_delay_ms: float = Field(
        0.0, ge=0, description="batching delay, counted from the oldest queued request's arrival (0: a batch goes "
        "as soon as the worker is free, holding what queued while it computed; > 0 trades latency for fuller batches)"
    )
    max_queue_rows: int = Field(2048, ge=1, description="queued rows beyond which requests get 503 (at least "
                                "max_batch_rows)")
    max_queue_wait_s: float | None = Field(
        2.0, gt=0, description="admission bound on the estimated queue wait (queued rows times the measured compute "
        "time per row): a request that would wait longer gets 503 at once, so that under overload the admitted "
        "requests are answered promptly instead of all waiting and timing out (None: only max_queue_rows bounds "
        "the queue; capped by request_timeout_s)"
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="a request that cannot be computed within this many seconds of its arrival "
        "(its queue wait plus the expected compute time) gets 504 instead of a late answer; above max_delay_ms"
    )


class LimitSettings(_Group):
    max_concurrent_requests: int | None = Field(
        1024, ge=1, description="HTTP requests handled at once (probes and /metrics not counted); beyond it a "
        "request gets 503 before anything else is done with it (None: no limit)"
    )
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest accepted request body")
    max_fit_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="largest accepted /fit upload")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="largest image (width x height, as its header declares) that POST /predict "
        "decodes; a larger one gets 413 before any pixel is decoded (a decompression bomb is a small file)"
    )


class AuthSettings(_Group):
    admin_token: SecretStr | None = Field(
        None, description="bearer token for POST /fit (unset, empty or blank: /fit disabled); surrounding "
        "whitespace is ignored"
    )
    read_token: SecretStr | None = Field(
        None, description="bearer token for /info, the page at / and the API docs (/docs, /redoc, /openapi.json; "
        "HTTP Basic with the token as password also works, for browsers); the admin token opens them too (unset, "
        "empty or blank: open to all)"
    )

    @field_validator("admin_token", "read_token", mode="before")
    @classmethod
    def _token(cls, v: object, info) -> object:
        """A blank token (``GGA_ADMIN_TOKEN=""``, what compose passes when it is unset) is
        unset: it would otherwise admit ``Authorization: Bearer`` with nothing after it."""
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if not isinstance(raw, str):
            return v
        if not raw.strip():
            if info.field_name == "admin_token":
                log.warning("GGA_ADMIN_TOKEN is set but empty: POST /fit stays disabled until it is set to a "
                            "non-blank token")
            else:
                log.warning("GGA_READ_TOKEN is set but empty: /info and the API docs stay open to all")
            return None
        return raw.strip()


class FitSettings(_Group):
    preset: Literal["paper", "gga", "composite", "fast"] = Field(
        "composite", json_schema_extra=_env("GGA_DETECTOR"),
        description="preset of new fits (POST /fit may name another): composite (GGA + logit + layer signals + the "
        "card's second opinion, the default), fast (the composite without GGA), gga (GGA with the max softmax), "
        "paper (the paper's configuration)",
    )
    top_n: int | None = Field(None, ge=3, description="classes analysed by new fits (None: the preset's choice, "
                              "5 for composite and gga, all for paper)")
    alpha: float = Field(
        0.05, gt=0, lt=1, json_schema_extra=_env("GGA_FIT_ALPHA"),
        description="alpha of new fits (POST /fit and gga-fit may name another): the fitted detector flags when "
        "trust < alpha",
    )
    batch_size: int = Field(
        256, ge=1, json_schema_extra=_env("GGA_FIT_BATCH_SIZE"),
        description="rows per model pass of a fit (in the service at most max_batch_rows: fit passes run on the "
        "compute worker between request batches)",
    )
    data_dir: Path | None = Field(None, description="server-side folder that POST /fit may read .npz files from")


class StorageSettings(_Group):
    artifact_dir: Path = Field(
        Path("artifacts"), validate_default=True, description="where fitted detector versions are written; a "
        "relative path is resolved against the working directory when the settings are built (shown absolute in "
        "/info and the startup log)"
    )
    reload_interval_s: float = Field(
        5.0, ge=0, description="how often the artifact store is checked for a newer detector version (written by "
        "another replica or by gga-fit), which is then validated and swapped in; 0: never"
    )

    @field_validator("artifact_dir")
    @classmethod
    def _artifact_dir(cls, v: Path) -> Path:
        """Absolute, once: a server started from another folder must not silently look elsewhere."""
        return v.expanduser().resolve()


GROUPS: dict[str, type[_Group]] = {
    "model": ModelSettings, "server": ServerSettings, "batching": BatchingSettings, "limits": LimitSettings,
    "auth": AuthSettings, "fit": FitSettings, "storage": StorageSettings,
}


def _env_name(field: str, info: FieldInfo) -> str:
    extra = info.json_schema_extra
    return extra["env"] if isinstance(extra, dict) and "env" in extra else PREFIX + field.upper()


def env_names() -> dict[str, tuple[str, str]]:
    """Every setting's environment variable -> ``(group, field)``, e.g. ``GGA_MAX_BATCH_ROWS -> ("batching",
    "max_batch_rows")``, ``GGA_SERVE_ALPHA -> ("model", "alpha")``; the deprecated ``GGA_ALPHA`` is not listed."""
    return {_env_name(field, info): (group, field)
            for group, cls in GROUPS.items() for field, info in cls.model_fields.items()}


ENV_NAMES = env_names()
_FLAT = {name.removeprefix(PREFIX).lower(): place for name, place in ENV_NAMES.items()}  # max_batch_rows -> ...
_BY_PLACE = {place: name for name, place in ENV_NAMES.items()}


class _FlatEnvironment(PydanticBaseSettingsSource):
    """The ``GGA_*`` variables that are set, as flat keys (``{"max_batch_rows": "8"}``); names are matched
    without regard to case. The deprecated ``GGA_ALPHA`` comes as ``alpha``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False  # unused: __call__ reads the environment as a whole

    def __call__(self) -> dict[str, Any]:
        env = {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(PREFIX)}
        found = {name.removeprefix(PREFIX).lower(): env[name] for name in ENV_NAMES if name in env}
        if DEPRECATED_ALPHA in env:
            found["alpha"] = env[DEPRECATED_ALPHA]
        return found


class Settings(BaseSettings):
    """All settings of the service, grouped (see the module docstring); the environment is read once, here."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", protected_namespaces=(), frozen=True)

    model: ModelSettings = Field(default_factory=ModelSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    fit: FitSettings = Field(default_factory=FitSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_explain(exc)) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _FlatEnvironment(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _grouped(cls, data: Any) -> Any:
        """Flat keys (from the environment or the constructor) into their groups; ``alpha`` (GGA_ALPHA) into
        both alphas that are not given, with a DeprecationWarning."""
        if not isinstance(data, dict):
            return data
        out: dict[str, Any] = {}
        flat: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            if key in _FLAT:
                group, field = _FLAT[key]
                flat.setdefault(group, {})[field] = value
            elif key != "alpha":
                out[key] = value
        if "alpha" in data:
            warnings.warn(f"{DEPRECATED_ALPHA} is deprecated: it sets GGA_SERVE_ALPHA (the served flag's alpha) and "
                          "GGA_FIT_ALPHA (the alpha of new fits) where those are not set; set them instead",
                          DeprecationWarning, stacklevel=2)
            flat.setdefault("model", {}).setdefault("alpha", data["alpha"])
            flat.setdefault("fit", {}).setdefault("alpha", data["alpha"])
        for group, fields in flat.items():
            given = out.get(group)
            if isinstance(given, BaseModel):
                given = given.model_dump()
            out[group] = {**(given or {}), **fields}
        return out

    @model_validator(mode="after")
    def _across_fields(self) -> Settings:
        """Values that are valid alone but not together (each would otherwise be bent silently at start-up)."""
        b = self.batching
        problems = []
        if b.max_queue_rows < b.max_batch_rows:
            problems.append(f"GGA_MAX_QUEUE_ROWS ({b.max_queue_rows}) is below GGA_MAX_BATCH_ROWS "
                            f"({b.max_batch_rows}): the queue could never hold one full batch")
        if b.request_timeout_s <= b.max_delay_ms / 1000.0:
            problems.append(f"GGA_REQUEST_TIMEOUT_S ({b.request_timeout_s:g} s) is not above GGA_MAX_DELAY_MS "
                            f"({b.max_delay_ms:g} ms): a request waiting for its batch would time out first")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def __getattr__(self, name: str) -> Any:
        """A flat name read on the grouped settings says where it lives now (``settings.max_batch_rows`` ->
        ``settings.batching.max_batch_rows``)."""
        if name in _FLAT:
            group, field = _FLAT[name]
            raise AttributeError(f"Settings has no attribute {name!r}: read settings.{group}.{field}")
        if name == "alpha":
            raise AttributeError("Settings has no attribute 'alpha': read settings.model.alpha (the served flag's, "
                                 "GGA_SERVE_ALPHA) or settings.fit.alpha (new fits', GGA_FIT_ALPHA)")
        return super().__getattr__(name)  # type: ignore[misc]


def _explain(exc: ValidationError) -> str:
    """One line per error, naming the environment variable: ``GGA_MAX_BATCH_ROWS=0: Input should be ...``."""
    lines = []
    for err in exc.errors():
        loc = tuple(str(part) for part in err["loc"])
        name = _BY_PLACE.get(loc[:2]) if len(loc) >= 2 else None
        if name is None and loc and loc[0] in GROUPS and len(loc) >= 2:
            name = f"{loc[0]}.{loc[1]}"
        msg = err["msg"].removeprefix("Value error, ")
        if name is None:
            lines.append(msg if not loc else f"{'.'.join(loc)}: {msg}")
        else:
            value = err.get("input")
            shown = "" if isinstance(value, dict | SecretStr) or "token" in name.lower() else f"={value!r}"
            lines.append(f"{name}{shown}: {msg}")
    return "invalid settings: " + "; ".join(lines)
