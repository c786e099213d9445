"""All settings in one typed object, read from CXR_* environment variables (README: configuration table)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Service configuration. Every field maps to the environment variable CXR_<FIELD_NAME>."""

    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=None, extra="ignore")

    # --- storage -------------------------------------------------------------------------------
    home: Path = Field(Path("var"), description="Base directory of the embedded defaults (spool, SQLite, broker).")
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite file home/cxr-triage.sqlite3.")
    spool_dir: Path | None = Field(None, description="Where received instances are written; empty = home/spool. With "
                                   "spool_url set, only the listener's scratch space for receiving.")  # fmt: skip
    spool_url: str = Field(
        "",
        description="s3://BUCKET/PREFIX: keep received instances (PREFIX/instances/) and result objects "
        "(PREFIX/results/) in an S3-compatible object store instead of the filesystem, so listeners and workers "
        "share no disk; empty = filesystem (spool_dir, results_dir). Credentials: AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION. The store must honour conditional writes (If-None-Match).",
        pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?)?$",
    )
    s3_endpoint_url: str = Field("", description="Endpoint of an S3-compatible store (MinIO, Ceph, ...); empty = AWS.")
    min_free_bytes: int = Field(
        1024**3,
        ge=0,
        description="The listener refuses new instances (0xA700, senders retry) while the spool's filesystem has "
        "less free space than this, or than min_free_percent; /readyz and /metrics show it.",
    )
    min_free_percent: float = Field(0.0, ge=0, lt=100, description="Free-space watermark as a share of the spool's "
                                    "filesystem (%); the larger of the two applies.")  # fmt: skip
    spool_retention_days: float = Field(
        0.0,
        ge=0,
        description="Remove the spool files of finished instances (done, failed, skipped) older than this (days); "
        "0 = keep them. Unfinished instances are never touched.",
    )
    spool_max_bytes: int = Field(
        0,
        ge=0,
        description="Keep the spool under this size by removing the files of the oldest finished instances first; "
        "0 = no limit.",
    )
    models_dir: Path = Field(Path("models"), description="Model registry directory (weights + model cards).")

    # --- broker --------------------------------------------------------------------------------
    broker_url: str = Field("", description="Celery broker URL (redis://...); empty = filesystem broker in home.")
    visibility_timeout_s: int = Field(3600, description="Redis visibility timeout (s); above the longest task.")

    # --- listener ------------------------------------------------------------------------------
    ae_title: str = Field("CXRTRIAGE", description="Our AE title.")
    bind_address: str = Field("127.0.0.1", description="Address the DICOM listener binds.")
    port: int = Field(11112, description="DICOM listener port.")
    allowed_calling_aets: CsvList = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate, compared exactly (comma-separated; empty = any, "
        "which a non-loopback bind_address refuses unless allow_any_calling_aet or TLS client certificates).",
    )
    allow_any_calling_aet: bool = Field(
        False,
        description="Let a listener bound to a non-loopback address accept any calling AE title (no allowlist, no "
        "TLS client certificates). Only for a network where something else decides who may connect.",
    )
    require_called_aet: bool = Field(True, description="Reject associations whose called AE title is not ours.")
    acse_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for association negotiation (A-ASSOCIATE, A-RELEASE) (s)."
    )
    dimse_timeout_s: float = Field(30.0, gt=0, description="Longest wait for a DIMSE message of an association (s).")
    network_timeout_s: float = Field(
        30.0, gt=0, description="An association with no data for this long is aborted (s)."
    )
    association_deadline_s: float = Field(
        10.0,
        gt=0,
        description="A connection must complete its TLS handshake and association request within this (s), however "
        "slowly it sends: idle and drip-feeding sockets do not hold a slot for longer.",
    )
    max_associations: int = Field(10, description="Maximum simultaneous associations.")
    duplicate_policy: Literal["replace", "keep-first", "reject"] = Field(
        "replace",
        description="An instance re-sent with the same SOP Instance UID but different content: replace (a corrected "
        "re-send: the new content is stored and triaged again), keep-first (stored content kept, sender told "
        "Success) or reject (0xC000 with an Error Comment). Every case is recorded in the instance's history.",
    )
    max_pdu: int = Field(
        1024 * 1024,
        ge=4096,
        le=64 * 1024 * 1024,
        description="Maximum PDU size we receive (bytes); a peer that sends a larger PDU is cut off.",
    )
    max_dataset_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Largest data set one C-STORE may carry, inflated size for Deflated Explicit VR too; larger ones "
        "are answered 0xA700 with a reason, and a connection sending more than twice this in one message is cut.",
    )
    tls_cert: Path | None = Field(None, description="PEM certificate: enables DICOM TLS on the listener.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_ca: Path | None = Field(None, description="CA bundle; when set, peers must present a client certificate.")
    outbox_interval_s: float = Field(5.0, description="How often the listener's outbox re-sends unqueued work (s).")
    requeue_after_s: float = Field(
        900.0,
        description="Re-send an instance queued for longer than this (s) even while the broker's queue holds work.",
    )
    heartbeat_s: float = Field(10.0, gt=0, description="How often a worker says it still holds an instance (s).")
    heartbeat_timeout_s: float = Field(
        60.0,
        gt=0,
        description="An instance whose worker has been silent this long is re-sent and may be taken over; an "
        "instance queued this long while the broker's queue is empty (messages lost) is re-sent (s).",
    )

    # --- intake policy -------------------------------------------------------------------------
    triage_modalities: CsvList = Field(default_factory=lambda: ["CR", "DX"], description="Modalities triaged.")
    triage_body_parts: CsvList = Field(
        default_factory=lambda: ["CHEST", "THORAX", "LUNG"],
        description="BodyPartExamined values triaged (absent BodyPartExamined is triaged).",
    )
    triage_view_positions: CsvList = Field(
        default_factory=lambda: ["PA", "AP"], description="ViewPosition values triaged (absent is triaged)."
    )

    # --- backlog: instances that can wait go to queue `backlog`, taken only when `gpu` is empty ---------------
    backlog_age_h: float = Field(
        0.0,
        ge=0,
        description="Triage an instance on the backlog queue when its StudyDate ended more than this many hours ago "
        "(the date's last minute, in the listener's local time: a day's granularity); 0 = by age never.",
    )
    backlog_calling_aets: CsvList = Field(
        default_factory=list,
        description="Calling AE titles of bulk senders (a migration, a PACS re-sending its archive) whose instances "
        "are triaged on the backlog queue, compared exactly (comma-separated; empty = none).",
    )
    backlog_priorities: CsvList = Field(
        default_factory=lambda: ["LOW"],
        description="RequestedProcedurePriority values whose instances are triaged on the backlog queue "
        "(comma-separated; empty = none).",
    )

    # --- workers -------------------------------------------------------------------------------
    device: str = Field("auto", description="Inference device: auto (CUDA if present), cpu or cuda.")
    triage_batch_size: int = Field(
        1,
        ge=1,
        le=256,
        description="Instances a worker triages in one pass: with more than 1, a task also claims up to this many "
        "other queued instances and runs each member once for all of them (their own messages then find them done). "
        "Pays off with a backend that gains from batches (bench/inference: openvino, onnx).",
    )
    cuda_batch_size: int = Field(
        64,
        ge=1,
        le=1024,
        description="On CUDA, the most instances a worker triages in one pass (claimed as with triage_batch_size, "
        "which applies on the CPU); fewer when 80% of the device's free memory holds fewer at the model set's peak "
        "cost per image, measured when the set loads. A larger pass raises throughput under a burst and the wait "
        "for its first result (all of a pass are decoded before inference). bench/inference --device cuda.",
    )
    inference_autocast: Literal["auto", "off", "bf16"] = Field(
        "auto",
        description="Precision of the PyTorch backends: auto = bf16 autocast on a CUDA GPU with native bf16 (compute "
        "capability 8.0 on), fp32 elsewhere; off = fp32 everywhere; bf16 = bf16 autocast on the CPU too (emulated "
        "there: slow, for checks). Probabilities and the OOD distance are computed in fp32 after the network. bf16 "
        "moves a trained member's outputs (README: GPU inference): evaluate a set at the precision it serves at.",
    )
    inference_backend: Literal["eager", "channels-last", "onnx", "openvino"] = Field(
        "eager",
        description="How the members run: eager PyTorch, PyTorch in the channels-last layout, or their ONNX export "
        "(exported once per weights file into home/onnx-cache) run by ONNX Runtime or OpenVINO at fp32 (CPU). "
        "bench/inference compares them.",
    )
    inference_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="CPU threads the members' forward passes use in a worker process (decoding and resizing stay on "
        "one: faster there). Give a worker that runs alone on a host (--pool solo, or --concurrency 1) the host's "
        "cores; with N worker processes, cores / N. bench/turnaround shows what it does.",
    )
    task_max_retries: int = Field(5, description="Retries of a transient task error before the instance fails.")
    task_max_attempts: int = Field(
        5, ge=1, description="Deliveries of an instance that never finished (worker died) before it is failed."
    )
    model_poll_s: float = Field(5.0, description="How often a worker checks the registry for a new promoted set.")
    max_decoded_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Largest frame a worker decodes, in pixel samples (Rows x Columns x SamplesPerPixel), checked "
        "on the declared size before decoding; larger instances fail with the size as reason. Only the first frame "
        "of a multi-frame object is decoded.",
    )

    # --- results back to the PACS ------------------------------------------------------------
    results_dir: Path | None = Field(None, description="Where SR and heatmap objects are kept; empty = home/results.")
    results_heatmap: bool = Field(True, description="Also write a Grad-CAM heatmap Secondary Capture.")
    results_destination_aet: str = Field("", description="AE title results are sent to; empty = keep them only.")
    results_destination_host: str = Field("127.0.0.1", description="Host of the results destination (the PACS).")
    results_destination_port: int = Field(104, description="Port of the results destination.")
    results_destination_tls: bool = Field(False, description="Use TLS towards the results destination.")
    results_tls_ca: Path | None = Field(None, description="CA bundle to verify the destination's TLS certificate.")
    results_routes: CsvList = Field(
        default_factory=list,
        description="Results to their sender: CALLING_AET=AE@host:port[+tls] entries (comma-separated); the DICOM "
        "results (SR, heatmap) of an instance sent by CALLING_AET go to that destination instead of the default "
        "(results_destination_*). Decided when the instance is queued and stored with it.",
    )
    results_send_max_retries: int = Field(8, description="Retries of a failed send before it is marked failed.")
    results_retry_base_s: float = Field(5.0, description="First retry delay (s); doubles each retry, capped at 1 h.")

    # --- results to the RIS (HL7 v2 over MLLP) and to a FHIR server ----------------------------
    # Sent, retried and recorded like the DICOM results (results_send_max_retries, results_retry_base_s).
    hl7_host: str = Field("", description="RIS host HL7 v2.5.1 messages are sent to over MLLP; empty = no HL7 out.")
    hl7_port: int = Field(2575, ge=1, le=65535, description="MLLP port of the RIS.")
    hl7_message: Literal["oru", "priority"] = Field(
        "oru",
        description="oru: an ORU^R01 with the finding, the scores and the study's priority for each AI result, and "
        "again when the study's effective priority changes; priority: an ORM^O01 order-priority update (ORC-1 XO) "
        "only when the study's effective priority changes.",
    )
    hl7_sending_application: str = Field("CXRTRIAGE", description="MSH-3 Sending Application.")
    hl7_sending_facility: str = Field("", description="MSH-4 Sending Facility.")
    hl7_receiving_application: str = Field("", description="MSH-5 Receiving Application (the RIS).")
    hl7_receiving_facility: str = Field("", description="MSH-6 Receiving Facility.")
    hl7_timeout_s: float = Field(30.0, gt=0, description="Longest wait to connect to the RIS and for its ACK (s).")
    hl7_tls: bool = Field(False, description="MLLP over TLS towards the RIS.")
    hl7_tls_ca: Path | None = Field(None, description="CA bundle to verify the RIS's TLS certificate; empty = system.")
    fhir_base_url: str = Field(
        "",
        description="Base URL of a FHIR R4 server: each AI result is posted there as a transaction Bundle "
        "(DiagnosticReport, Observations, Device); empty = no FHIR out.",
        pattern=r"^(https?://\S+)?$",
    )
    fhir_token: str = Field("", description="Bearer token sent to the FHIR server; empty = no Authorization header.")
    fhir_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the FHIR server's answer (s).")
    fhir_tls_ca: Path | None = Field(
        None, description="CA bundle to verify the FHIR server's certificate (https); empty = the system's CAs."
    )

    # --- retraining (queue `training`) ---------------------------------------------------------
    retrain_manifest: Path | None = Field(None, description="Manifest retraining reads (shared format); empty = off.")
    retrain_work_dir: Path | None = Field(None, description="Locked split and data card; empty = home/retrain.")
    retrain_architectures: list[str] = Field(
        default_factory=lambda: ["mobilenetv2_100"], description="timm architectures trained (comma-separated)."
    )
    retrain_epochs: int = Field(18, ge=1, description="Epochs per architecture.")
    retrain_size: int = Field(224, ge=32, description="Input size (px).")
    retrain_threads: int = Field(2, ge=1, description="Torch threads for CPU training.")
    retrain_schedule: str = Field(
        "", description="Celery beat crontab 'minute hour day-of-month month day-of-week'; empty = no schedule."
    )
    gate_max_auroc_drop: float = Field(0.02, description="Gate: largest allowed macro AUROC drop (95% CI bound).")
    gate_min_macro_auroc: float = Field(0.70, description="Gate: macro AUROC floor for a first model.")
    gate_min_covid_sensitivity: float = Field(0.70, description="Gate: COVID-19 sensitivity floor.")
    gate_max_ece: float = Field(0.15, description="Gate: expected calibration error ceiling.")

    # --- logging -------------------------------------------------------------------------------
    log_level: str = Field("INFO", description="Log level.")
    log_format: str = Field("json", description="json or console.")

    # --- worklist ------------------------------------------------------------------------------
    # The worklist API and page (worklist/) and its priority rules (cxr_triage/priority.py).
    api_host: str = Field("127.0.0.1", description="Address the worklist API and page bind.")
    api_port: int = Field(8080, ge=1, le=65535, description="Port of the worklist API and page.")
    stat_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="STAT when the COVID-19 or Pneumonia probability is at least this; empty = the promoted "
        "set's operating point (chosen on validation), else 0.5.",
    )
    routine_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Routine only when the No finding probability is at least this; empty = the promoted set's "
        "operating point, else 0.8.",
    )
    indeterminate_margin: float = Field(
        0.05, ge=0, lt=1, description="A probability this close to a threshold is indeterminate (for a human)."
    )
    disagreement_threshold: float = Field(
        0.5, gt=0, le=1, description="Indeterminate when ensemble members' probabilities for a class differ by this."
    )
    session_ttl_s: float = Field(43200.0, gt=0, description="Lifetime of a worklist login session (s).")
    session_cookie_secure: bool = Field(False, description="Send the session cookie only over HTTPS.")
    worklist_poll_s: float = Field(3.0, gt=0, description="How often the worklist page asks for new results (s).")
    worklist_shadow_users: CsvList = Field(
        default_factory=list,
        description="Usernames (comma-separated) who see the shadow set's prediction on the study page and in the "
        "study's API detail, marked as shadow (not used); never in the list or the priority. Empty = nobody.",
    )
    drift_baseline_days: int = Field(
        28,
        ge=7,
        le=365,
        description="Drift: the last day's STAT and out-of-distribution rates are compared with the "
        "daily rates of this many previous days (the worklist header warns when outside their range).",
    )
    drift_min_cases: int = Field(
        20, ge=1, description="Drift: a day counts (as the last day or in the baseline) only with this many cases."
    )
    drift_tolerance: float = Field(
        0.05, ge=0, le=1, description="Drift: the baseline's [min, max] daily rate is widened by this (absolute)."
    )
    drift_refresh_s: float = Field(
        300.0,
        ge=0,
        description="How often the API re-reads the daily prediction counts (drift warning, 24-hour metrics) and the "
        "AI's agreement with confirmed reads (header, metrics) (s); 0 = at every request.",
    )
    login_max_failures: int = Field(
        5, ge=1, description="Failed logins per username, and per client address, within the window before 429."
    )
    login_max_failures_per_address: int = Field(
        0, ge=0, description="Failed logins per client address within the window; 0 = CXR_LOGIN_MAX_FAILURES."
    )
    login_window_s: float = Field(300.0, gt=0, description="Window of the failed-login count (s).")
    password_scrypt_n: int = Field(
        2**17, ge=2, le=2**20, description="scrypt cost N (a power of two; r=8, p=1) of new password hashes."
    )
    password_min_length: int = Field(12, ge=1, description="Minimum password length for `users create`/`passwd`.")
    api_max_body_bytes: int = Field(65536, ge=1, description="Largest request body the API accepts (else 413).")
    metrics_cache_s: float = Field(5.0, ge=0, description="How long /metrics reuses its last database read (s).")
    audit_syslog: str = Field(
        "",
        description="udp://HOST[:PORT], tcp://HOST[:PORT] or tls://HOST[:PORT]: also send each access audit event "
        "as an RFC 5424 syslog message carrying an IHE ATNA (DICOM PS3.15 A.5) audit message (ports 514, 514, 6514 "
        "by default); empty = the database only. The database row is the record; a failed send is logged.",
        pattern=r"^((udp|tcp|tls)://[^\s/?#]+)?$",
    )
    audit_syslog_ca: Path | None = Field(
        None, description="CA bundle to verify the tls:// syslog receiver's certificate; empty = the system's CAs."
    )

    # --- DICOMweb STOW-RS (POST /dicomweb/studies, in the API process) -------------------------
    # The same intake path as a C-STORE (listener/accept.py): max_dataset_bytes, the free-space watermark, the intake
    # policy and duplicate_policy apply to each instance.
    stow_users: CsvList = Field(
        default_factory=list,
        description="Usernames (comma-separated; service accounts made with `cxr-triage users create` and `users "
        "token`) that may store instances by STOW-RS with their bearer token; empty = STOW-RS refuses everyone (403).",
    )
    stow_max_request_bytes: int = Field(
        4 * 1024**3,
        ge=1,
        description="Largest STOW-RS request body (bytes), all its instances together; larger is answered 413 "
        "(the instances before the limit are stored and listed). Each instance is also held to max_dataset_bytes.",
    )
    stow_max_instances: int = Field(
        1000,
        ge=1,
        description="Most instances (parts) one STOW-RS request may carry; a request with more is answered 413 after "
        "this many (stored and listed).",
    )

    @field_validator("password_scrypt_n")
    @classmethod
    def _check_scrypt_n(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"password_scrypt_n must be a power of two, got {value}")
        return value

    @field_validator("allowed_calling_aets", "backlog_calling_aets", mode="before")
    @classmethod
    def _split_ae_titles(cls, value: object) -> object:
        # AE titles are matched exactly as configured (DICOM AE titles are case-sensitive); only spaces are trimmed.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [str(part).strip() for part in value]
        return value

    @field_validator(
        "triage_body_parts",
        "triage_view_positions",
        "triage_modalities",
        "backlog_priorities",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().upper() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [str(part).strip().upper() for part in value]
        return value

    @field_validator(
        "spool_dir",
        "tls_cert",
        "tls_key",
        "tls_ca",
        "results_dir",
        "results_tls_ca",
        "hl7_tls_ca",
        "fhir_tls_ca",
        "retrain_manifest",
        "retrain_work_dir",
        "audit_syslog_ca",
        "stat_threshold",
        "routine_threshold",
        mode="before",
    )
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        # `CXR_TLS_CERT=` must mean "no TLS", not Path(".").
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("retrain_architectures", "worklist_shadow_users", "stow_users", "results_routes", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("results_routes")
    @classmethod
    def _check_routes(cls, value: list[str]) -> list[str]:
        from cxr_triage.routes import parse_routes

        parse_routes(value)  # raises ValueError with the entry that is wrong
        return value

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        value = value.strip()
        if not 0 < len(value) <= 16 or "\\" in value:
            raise ValueError(f"AE title must be 1-16 characters without backslash, got {value!r}")
        return value

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'cxr-triage.sqlite3').resolve()}"

    @property
    def effective_spool_dir(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.home / "spool"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def effective_results_dir(self) -> Path:
        return self.results_dir if self.results_dir is not None else self.home / "results"

    @property
    def effective_retrain_work_dir(self) -> Path:
        return self.retrain_work_dir if self.retrain_work_dir is not None else self.home / "retrain"

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
