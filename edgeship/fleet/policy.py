"""params.yaml's `fleet:` (broker, store) and `rollout:` (per-channel rollout policy) sections.

The names follow AWS IoT Jobs where they mean the same (`exponential_rate.increment_factor`,
`abort_criteria[].failure_type / min_executed_devices / threshold_percentage`), so the config reads
familiar to an operator:

    rollout:
      default:
        stages: [0.01, 0.05, 0.25, 1.0]    # or exponential_rate: {base_fraction: 0.01, increment_factor: 2}
        min_reporting_devices: 5           # per stage, before its soak can end
        soak_s: 600
        latency: {significance: 0.01, max_ratio_to_base: 2}   # a p99 over budget must be the candidate's doing
        success: {min_install_success: 0.95, min_probation_success: 0.95, min_shadow_agreement: 0.97,
                  max_drift_psi: 0.25, p99_budget_ms: {pi4: 40}}   # default budget: the gate's, per target
        agreement: {min_compared: 200, min_agreement: 0.5, abort_below: 0.5}   # against the model it replaces
        cohort: {enabled: true, abort: false}   # class and confidence mix, candidate cohort vs base cohort
        abort_criteria:
          - {failure_type: probation, min_executed_devices: 3, threshold_percentage: 20}
      channels: {canary: {...}}            # a channel's own policy; others use `default`
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeship.records.field import FieldSampling

FailureType = Literal["install", "probation", "latency", "disagreement", "fallback", "all"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerParams(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_env: str | None = Field(default=None, description="environment variable holding the password")


def store_url_for(url: str, root) -> str:
    """The store URL with a relative SQLite path resolved against the project directory."""
    from pathlib import Path

    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix):].startswith("/") and url[len(prefix):] != ":memory:":
        return prefix + str((Path(root) / url[len(prefix):]).resolve())
    return url


class CollectorParams(_Section):
    """How each collector receives and stores (edgeship.fleet.collector.CollectorSettings)."""

    group: str = Field(default="edgeship", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                       description="MQTT 5 shared subscription group of the collectors")
    session_expiry_s: int = Field(default=600, ge=0, description="how long the broker keeps a member's session")
    receive_maximum: int = Field(default=1000, ge=1, le=65535, description="messages in flight to one collector "
                                 "(MQTT 5 Receive Maximum); the broker's own cap must be at least this")
    batch_size: int = Field(default=500, ge=1, description="records stored per transaction")
    max_delay_s: float = Field(default=0.2, gt=0, description="a batch waits at most this for more records")


class FleetParams(_Section):
    name: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="topic namespace: edgeship/<name>/devices/<id>/...")
    broker: BrokerParams | None = Field(default=None, description="none: `fleet collect` starts a local broker")
    store: str = Field(default="sqlite:///fleet.db", description="SQLAlchemy URL of the fleet store")
    window_s: float = Field(default=60.0, gt=0, description="devices' telemetry window")
    collector: CollectorParams = Field(default_factory=CollectorParams, description="batches, receive window and "
                                       "shared subscription of `edgeship fleet collect`")
    rollup_bucket_s: float = Field(default=300.0, gt=0, description="time bucket of the fleet-wide rollups; a change "
                                   "needs `edgeship fleet replay`")
    retention_days: float = Field(default=7.0, gt=0, description="raw records are kept this long (replayable)")
    rollup_retention_days: float = Field(default=90.0, gt=0, description="rollups are kept this long")


def open_store(fleet: FleetParams, root):
    """The fleet store params.yaml names (a relative SQLite path resolved against `root`)."""
    from edgeship.fleet.store import FleetStore

    return FleetStore(store_url_for(fleet.store, root), bucket_s=fleet.rollup_bucket_s)


class ExponentialRate(_Section):
    base_fraction: float = Field(default=0.01, gt=0, le=1)
    increment_factor: float = Field(default=2.0, gt=1)


class SuccessCriteria(_Section):
    min_install_success: float = Field(default=0.95, ge=0, le=1)
    min_probation_success: float = Field(default=0.95, ge=0, le=1)
    min_shadow_agreement: float = Field(default=0.97, ge=0, le=1)
    max_drift_psi: float = Field(default=0.25, gt=0)
    p99_budget_ms: dict[str, float] = Field(default_factory=dict,
                                            description="per device class; others use the gate's p99 budget")


class LatencyAnalysis(_Section):
    """How a device's tail over its p99 budget becomes evidence against the candidate (edgeship.fleet.latency)."""

    significance: float = Field(default=0.01, gt=0, lt=0.5, description="a device fails on latency when a "
                                "one-sided binomial test of its over-budget answers rejects 'no worse than "
                                "allowed' at this level")
    max_ratio_to_base: float = Field(default=2.0, ge=1, description="the candidate may have this many times the "
                                     "base's over-budget share on the same device class over the same time")


class AgreementPolicy(_Section):
    """The candidate's answers against the model it replaced, compared on the devices serving it on every rollout
    (edgeship.fleet.agreement)."""

    min_compared: int = Field(default=200, ge=0, description="compared answers (all the candidate's devices "
                              "together) before a stage can advance; 0: not required (devices too old to compare)")
    min_agreement: float = Field(default=0.5, ge=0, le=1, description="a stage advances only when the candidate "
                                 "gives the base's answer at least this often; low by default, since a release "
                                 "retrained after a shift rightly disagrees wherever the base was wrong (raise it, e.g. "
                                 "0.95, for releases that should answer like the base: a re-quantization)")
    abort_below: float = Field(default=0.5, ge=0, le=1, description="the `disagreement` abort criterion: a device "
                               "fails when its agreement is significantly below this (one-sided Wilson bound): a "
                               "candidate that gives another answer on most inputs")
    significance: float = Field(default=0.01, gt=0, lt=0.5, description="level of that bound")


class CohortPolicy(_Section):
    """The candidate cohort's predicted-class mix and confidence distribution against the base cohort's
    (edgeship.fleet.cohort): chi-squared up to `max_chi2_answers`, Jensen-Shannon distance above."""

    enabled: bool = Field(default=True, description="a success criterion: a stage advances only when neither mix "
                          "differs (and each cohort gave `min_answers`)")
    abort: bool = Field(default=False, description="also abort when a mix differs (off: a different input mix on a "
                        "small cohort is more often chance than the model)")
    confidence: bool = Field(default=False, description="compare the confidence distributions too (off: two models' "
                             "confidences differ by design, e.g. a retrain calibrated otherwise; on for a candidate "
                             "that should answer like the base, e.g. the same model quantized another way)")
    min_answers: int = Field(default=200, ge=1, description="answers of each cohort before the test says anything")
    max_chi2_answers: int = Field(default=1000, ge=1, description="up to this many answers in the smaller cohort: "
                                  "chi-squared test of homogeneity; above: Jensen-Shannon distance")
    significance: float = Field(default=0.01, gt=0, lt=0.5, description="chi-squared: a mix differs below this "
                                "p-value")
    max_js_distance: float = Field(default=0.1, gt=0, le=1, description="Jensen-Shannon distance (natural log) "
                                   "above which a mix differs")


class FieldAccuracyPolicy(_Section):
    """Labelled field accuracy: the applications' ground truth (`POST /feedback`), per version
    (edgeship.fleet.field_accuracy)."""

    min_accuracy: float | None = Field(default=None, ge=0, le=1, description="success: the candidate's labelled "
                                       "field accuracy is at least this (none: not required)")
    min_labelled: int = Field(default=200, ge=1, description="labelled answers a version needs before its accuracy "
                              "counts (the candidate's for min_accuracy; both sides' for the drop test)")
    abort_on_drop: bool = Field(default=True, description="abort when the candidate's labelled accuracy is "
                                "significantly below the base's on the same stretch")
    max_drop: float = Field(default=0.02, ge=0, le=1, description="the drop against the base that is tolerated")
    significance: float = Field(default=0.01, gt=0, lt=0.5, description="level of the one-sided two-proportion test")


class FieldSamplesParams(FieldSampling):
    """A channel's field samples (off unless given): signed into its entries at publish."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class AbortCriterion(_Section):
    failure_type: FailureType
    min_executed_devices: int = Field(default=3, ge=1)
    threshold_percentage: float = Field(default=20.0, gt=0, le=100)


class ChannelPolicy(_Section):
    stages: list[float] | None = Field(default_factory=lambda: [0.01, 0.05, 0.25, 1.0])
    exponential_rate: ExponentialRate | None = None
    min_reporting_devices: int = Field(default=5, ge=1)
    min_samples_per_device: int = Field(default=50, ge=1, description="answers (or comparisons with the base) before a "
                                        "device's own p99 or agreement counts toward an abort")
    soak_s: float = Field(default=600.0, ge=0)
    latency: LatencyAnalysis = Field(default_factory=LatencyAnalysis)
    success: SuccessCriteria = Field(default_factory=SuccessCriteria)
    agreement: AgreementPolicy = Field(default_factory=AgreementPolicy)
    cohort: CohortPolicy = Field(default_factory=CohortPolicy)
    field_accuracy: FieldAccuracyPolicy = Field(default_factory=FieldAccuracyPolicy)
    field_samples: FieldSamplesParams | None = Field(default=None, description="devices keep and upload a share "
                                                     "of their inputs (opt-in; none: off)")
    abort_criteria: list[AbortCriterion] = Field(default_factory=lambda: [
        AbortCriterion(failure_type="install"), AbortCriterion(failure_type="probation"),
        AbortCriterion(failure_type="latency"), AbortCriterion(failure_type="disagreement")])

    @field_validator("stages")
    @classmethod
    def _increasing_to_one(cls, stages: list[float] | None) -> list[float] | None:
        if stages is None:
            return None
        if not stages or any(not 0 < s <= 1 for s in stages) or stages != sorted(set(stages)) or stages[-1] != 1.0:
            raise ValueError(f"stages must be increasing fractions in (0, 1] ending at 1.0, got {stages}")
        return stages

    @model_validator(mode="after")
    def _one_schedule(self) -> ChannelPolicy:
        if self.exponential_rate is not None:
            self.stages = None
        elif self.stages is None:
            raise ValueError("give either stages or exponential_rate")
        return self

    @property
    def first_stage(self) -> float:
        return self.exponential_rate.base_fraction if self.exponential_rate else self.stages[0]

    def next_fraction(self, current: float) -> float:
        """The stage after `current` (1.0 at the end)."""
        if self.exponential_rate is not None:
            if current <= 0:
                return self.exponential_rate.base_fraction
            return min(1.0, current * self.exponential_rate.increment_factor)
        return next((s for s in self.stages if s > current + 1e-9), 1.0)


class RetrainingPolicy(_Section):
    deployment: str = Field(default="release/scheduled-retraining", description="'flow/deployment' to start")
    max_drift_psi: float = Field(default=0.2, gt=0, description="fleet drift on production past this starts it")
    min_samples: int = Field(default=500, ge=1)
    cooldown_s: float = Field(default=86400.0, ge=0, description="no second start within this")
    window_s: float = Field(default=3600.0, gt=0, description="production telemetry this recent is what counts")


class RolloutParams(_Section):
    default: ChannelPolicy = Field(default_factory=ChannelPolicy)
    channels: dict[str, ChannelPolicy] = Field(default_factory=dict)
    retraining: RetrainingPolicy = Field(default_factory=RetrainingPolicy)

    def policy_for(self, channel: str) -> ChannelPolicy:
        return self.channels.get(channel, self.default)
