"""What every inference route shares once its body is decoded: the model card's value range and the
batcher submission, with the batcher's refusals turned into the service's errors (``/predict`` and the
Open Inference Protocol's ``infer`` both go through here, so they queue, refuse and time out alike)."""

from __future__ import annotations

import math

import numpy as np

from detectors.csm import NonFiniteLogitsError
from service.batching import BatcherClosedError, QueueFullError, QueueTimeoutError, RequestTooLargeError
from service.errors import ApiError
from service.worker import NoDetectorError, PredictPayload, merge_results, split_payload


def range_warnings(card, x: np.ndarray) -> list[dict]:
    """The model card's value range: out-of-range samples are a 422 (policy reject) or warnings (warn)."""
    bad = card.check_range(x)
    if not bad:
        return []
    lo, hi = card.value_range
    i, vmin, vmax = bad[0]
    if card.value_range_policy == "reject":
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ApiError(422, "out_of_range", f"sample {i}{more} has values in [{vmin:.6g}, {vmax:.6g}]; this model "
                       f"takes values in [{lo:g}, {hi:g}] (model card value_range), e.g. pixels divided by 255")
    return [{"sample": j, "message": f"values in [{a:.6g}, {b:.6g}] are outside the model's range [{lo:g}, {hi:g}]"}
            for j, a, b in bad]


async def score_rows(st, x: np.ndarray, return_csm: bool, explain: bool = False) -> list[dict]:
    """The prediction rows of ``x`` from the batcher (one ``PredictPayload``); its refusals as ApiError:
    503 queue full (with Retry-After), shutting down or no detector, 504 not computed in time, 413 too
    large, 422 non-finite model output."""
    try:
        return await st.batcher.submit(PredictPayload(x, return_csm, explain), len(x), split=split_payload,
                                       merge=merge_results)
    except QueueFullError as exc:
        why = f"{exc.queued_rows} of {exc.max_queue_rows} rows queued" if exc.estimated_wait_s is None \
            else f"estimated wait {exc.estimated_wait_s:.1f} s"
        raise ApiError(503, "overloaded", f"the queue is full ({why}); retry later",
                       headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}) from exc
    except QueueTimeoutError as exc:
        raise ApiError(504, "timeout", "the request could not be computed within "
                       f"{st.settings.batching.request_timeout_s} s of its arrival (it waited in the queue) and was "
                       "not computed") from exc
    except RequestTooLargeError as exc:
        raise ApiError(413, "payload_too_large", str(exc)) from exc
    except BatcherClosedError as exc:
        raise ApiError(503, "unavailable", "the service is shutting down") from exc
    except NoDetectorError as exc:
        raise ApiError(503, "no_detector", str(exc)) from exc
    except NonFiniteLogitsError as exc:
        raise ApiError(422, "non_finite_output", str(exc)) from exc
