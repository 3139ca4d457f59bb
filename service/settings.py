"""Service settings: one pydantic-settings class, environment prefix ``GGA_``.

Built explicitly (``Settings()`` reads the environment when it is constructed, never
at import time) and passed to ``create_app(settings)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("service.settings")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GGA_", extra="ignore", protected_namespaces=())

    model: str = Field(
        "mnist_cnn",
        description="The classifier: a built-in architecture name (mnist_cnn, cifar_resnet20, "
        "cifar_resnet56), 'torchscript:<path>' or 'factory:<package.module>:<function>'. "
        "The default serves the bundled reference MNIST CNN with its fitted detector.",
    )
    model_weights: Path | None = Field(
        None, description="safetensors weights (built-in and factory models); the bundled weights for mnist_cnn"
    )
    model_card: Path | None = Field(
        None, description="model card JSON (input_shape, class_names); default: model_card.json beside the "
        "weights, or the built-in card of the architecture"
    )
    artifact_dir: Path = Field(
        Path("artifacts"), validate_default=True, description="where fitted detector versions are written; a "
        "relative path is resolved against the working directory when the settings are built (shown absolute in "
        "/info and the startup log)"
    )
    reload_interval_s: float = Field(
        5.0, ge=0, description="how often the artifact store is checked for a newer detector version (written by "
        "another replica or by gga-fit), which is then validated and swapped in; 0: never"
    )
    data_dir: Path | None = Field(None, description="server-side folder that POST /fit may read .npz files from")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    detector: Literal["paper", "gga", "composite"] = Field(
        "composite", description="preset of new fits (POST /fit may name another): composite (GGA + logit + layer "
        "signals, the default), gga (GGA with the max softmax), paper (the paper's configuration)"
    )
    top_n: int | None = Field(None, ge=3, description="classes analysed by new fits (None: the preset's choice, "
                              "5 for composite and gga, all for paper)")
    alpha: float | None = Field(
        None, gt=0, lt=1, description="flag when trust < alpha (None: the detector's own alpha, 0.05)"
    )
    max_batch_rows: int = Field(64, ge=1, description="rows per compute batch")
    strategy: Literal["auto", "device", "loop", "vmap", "replicate"] = Field(
        "auto", description="how the per-class gradients are computed: auto (each of loop, vmap and replicate "
        "timed at startup at batch sizes 1, 8 and max_batch_rows, the fastest per batch size kept for the "
        "process), device (loop on CPU, vmap on accelerators, no measurement) or one fixed strategy"
    )
    max_delay_ms: float = Field(
        0.0, ge=0, description="batching delay, counted from the oldest queued request's arrival (0: a batch goes "
        "as soon as the worker is free, holding what queued while it computed; > 0 trades latency for fuller batches)"
    )
    max_queue_rows: int = Field(2048, ge=1, description="queued rows beyond which requests get 503")
    max_queue_wait_s: float | None = Field(
        2.0, gt=0, description="admission bound on the estimated queue wait (queued rows times the measured compute "
        "time per row): a request that would wait longer gets 503 at once, so that under overload the admitted "
        "requests are answered promptly instead of all waiting and timing out (None: only max_queue_rows bounds "
        "the queue; capped by request_timeout_s)"
    )
    max_concurrent_requests: int | None = Field(
        1024, ge=1, description="HTTP requests handled at once (probes and /metrics not counted); beyond it a "
        "request gets 503 before anything else is done with it (None: no limit)"
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="a request that cannot be computed within this many seconds of its arrival "
        "(its queue wait plus the expected compute time) gets 504 instead of a late answer"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="time a client has to send a request's line and headers, counted from the "
        "connection's start (first request) or the request's first byte (later keep-alive requests), not restarted "
        "by each byte; past it: 408 request_timeout and the connection closed (closed silently if nothing arrived)"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="longest silence while a request body is still being received (restarted by every "
        "chunk; not counted while the server is not reading); past it the request ends (408 request_timeout if no "
        "response began) and the connection is closed"
    )
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest accepted request body")
    max_fit_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="largest accepted /fit upload")
    admin_token: SecretStr | None = Field(
        None, description="bearer token for POST /fit (unset, empty or blank: /fit disabled); surrounding "
        "whitespace is ignored"
    )
    read_token: SecretStr | None = Field(
        None, description="bearer token for /info and the API docs (/docs, /redoc, /openapi.json; HTTP Basic with "
        "the token as password also works, for browsers); the admin token opens them too (unset, empty or blank: "
        "open to all)"
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch's default)")
    fit_batch_size: int = Field(256, ge=1, description="rows per model pass of a fit (in the service at most "
                                "max_batch_rows: fit passes run on the compute worker between request batches)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    shutdown_grace_s: float = Field(
        10.0, gt=0, description="on SIGTERM: at once stop admitting (503, /readyz 503) and keep computing the queued "
        "requests; requests still queued shortly before this grace ends get 503; then exit"
    )

    @field_validator("model")
    @classmethod
    def _model_spec(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must not be empty")
        return v.strip()

    @field_validator("artifact_dir")
    @classmethod
    def _artifact_dir(cls, v: Path) -> Path:
        """Absolute, once: a server started from another folder must not silently look elsewhere."""
        return v.expanduser().resolve()

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
