"""Response and request models: they document the HTTP contract in the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    type: str = Field(..., examples=["invalid_shape"])
    message: str = Field(..., examples=["input has shape (1, 28, 28); expected (B, 1, 28, 28)"])


class ErrorResponse(BaseModel):
    error: ErrorBody


class PredictRequest(BaseModel):
    inputs: list[Any] = Field(..., description="samples, each a nested list of the model's input shape")
    return_csm: bool = Field(False, description="include each sample's N×N cosine similarity matrix")
    explain: bool = Field(False, description="include each detector component's p-value per sample")


class TopClass(BaseModel):
    label: int
    name: str


class ComponentP(BaseModel):
    name: str
    p_value: float | None


class Prediction(BaseModel):
    label: int = Field(..., description="predicted class index")
    label_name: str
    confidence: float = Field(..., description="softmax probability of the predicted class")
    top_classes: list[TopClass] = Field(..., description="up to 5 of the analysed top-N classes, best first")
    score: float | None = Field(..., description="raw GGA/LODA anomaly score, higher = more anomalous")
    trust: float = Field(..., description="conformal p-value in (0, 1]: the share of calibration samples that "
                         "scored at least as anomalous")
    flagged: bool = Field(..., description="trust < alpha: do not act on this prediction")
    prediction_set: list[int] | None = Field(None, description="conformal prediction set: the classes that contain "
                                             "the true label with probability >= 1 - set_alpha (/info) on "
                                             "exchangeable (unflagged) inputs; may be empty; null without sets")
    prediction_set_names: list[str] | None = Field(None, description="the model card's names of prediction_set")
    accept: bool | None = Field(None, description="the selective gate: act on this prediction automatically "
                                "(error rate among accepted <= risk_target with confidence 1 - delta); false "
                                "whenever flagged; null when the detector has no gate (reason in /info)")
    detector_version: str
    csm: list[list[float]] | None = Field(None, description="N×N CSM, predicted class first (on request)")
    components: list[ComponentP] | None = Field(
        None, description="with explain: each detector component's p-value (small = that signal finds the sample "
        "unusual), in the order of /info's detector.components")


class RangeWarning(BaseModel):
    sample: int
    message: str


class PredictResponse(BaseModel):
    model: str
    alpha: float
    predictions: list[Prediction]
    warnings: list[RangeWarning] | None = Field(
        None, description="samples outside the model card's value_range (only with value_range_policy 'warn'; "
        "with 'reject' they are a 422)")


class FitAccepted(BaseModel):
    id: str
    state: str
    status_url: str


class FitProgress(BaseModel):
    done: int
    total: int


class FitJobView(BaseModel):
    id: str
    state: str = Field(..., description="queued | running | succeeded | failed")
    phase: str = Field(..., description="queued | features | fitting | saving | done")
    progress: FitProgress
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: dict[str, Any] | None = Field(None, description="counts, model accuracy, threshold, new version")
    error: str | None


class FitPathRequest(BaseModel):
    path: str = Field(..., description="an .npz file (arrays x and y) inside the server's GGA_DATA_DIR")
    preset: Literal["composite", "fast", "gga", "paper"] | None = Field(
        None, description="detector preset (default: GGA_DETECTOR, composite)")
    top_n: int | None = Field(None, ge=3, description="classes in the CSM (default: GGA_TOP_N, else the preset's "
                              "choice: 5 for composite and gga, all for paper)")
    alpha: float | None = Field(None, gt=0, lt=1, description="flag when trust < alpha (default 0.05)")
    set_alpha: float | None = Field(None, gt=0, lt=1, description="prediction sets' miscoverage (default 0.1)")
    risk_target: float | None = Field(None, gt=0, lt=1, description="accept gate's risk (default 0.01; given: "
                                      "the fit fails when the data cannot support it)")
    delta: float | None = Field(None, gt=0, lt=1, description="accept gate's 1 - confidence (default 0.05)")


class Info(BaseModel):
    model: str
    input_shape: list[int]
    class_names: list[str]
    device: str
    detector_version: str | None
    artifact_dir: str = Field(description="the artifact store (GGA_ARTIFACT_DIR), absolute")
    detector: dict[str, Any] | None
    decisions: dict[str, Any] | None = Field(None, description="prediction sets and accept gate: set_alpha, "
                                             "set_score, risk_target, delta, gate_score, gate_threshold, gate_error")
    alpha: float | None
    batching: dict[str, Any]
    model_card: dict[str, Any]
    preprocessing: dict[str, Any] | None = Field(
        None, description="how an image body becomes a sample (the model card's preprocessing, resolved); null: "
        "the model takes no image bodies")
