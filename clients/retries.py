"""Retrying idempotent calls that fail with UNAVAILABLE, with exponential backoff and jitter."""

import logging
import random
import time
from collections.abc import Iterator

import grpc

from lasagne_engine.interceptors import is_read_only

__all__ = ["IDEMPOTENT_WRITES", "RetryPolicy", "RetryingInterceptor", "is_idempotent"]

logger = logging.getLogger(__name__)

# Methods that change data but leave the same state when repeated, so they are safe to retry.
IDEMPOTENT_WRITES = frozenset({"TagParameterSet", "HoldParameterSet", "ReleaseParameterSet"})


def is_idempotent(method: str) -> bool:
    """Return whether repeating a call of ``method`` (``/package.Service/Method``) leaves the same state."""
    return is_read_only(method) or method.rsplit("/", 1)[-1] in IDEMPOTENT_WRITES


class RetryPolicy:
    """How often and how long to wait before retrying a call that failed with UNAVAILABLE.

    The n-th retry waits ``min(initial_backoff_s * 2**(n-1), max_backoff_s)`` seconds, scaled by
    a random factor between 0.5 and 1 so that many clients do not retry in step.

    Parameters
    ----------
    max_retries : int
        Retries after the first attempt; 0 turns retrying off. Default 5.
    initial_backoff_s, max_backoff_s : float
        Wait before the first retry, and the cap of the doubling waits. Defaults 0.25 and 4.
    """

    def __init__(self, max_retries: int = 5, *, initial_backoff_s: float = 0.25, max_backoff_s: float = 4.0):
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries!r} must be 0 or more.")
        self.max_retries = max_retries
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s

    def backoffs_s(self) -> Iterator[float]:
        """Yield the wait before each retry."""
        for retry in range(self.max_retries):
            yield min(self.initial_backoff_s * 2**retry, self.max_backoff_s) * random.uniform(0.5, 1.0)


class RetryingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Retries unary calls of idempotent methods that fail with UNAVAILABLE, within the call's deadline.

    Streaming calls pass through; the SDK resumes downloads and loads itself.
    """

    def __init__(self, policy: RetryPolicy):
        self.policy = policy

    def intercept_unary_unary(self, continuation, client_call_details, request):
        outcome = continuation(client_call_details, request)
        method = client_call_details.method
        if not is_idempotent(method):
            return outcome

        deadline = None if client_call_details.timeout is None else time.monotonic() + client_call_details.timeout
        for retry, backoff_s in enumerate(self.policy.backoffs_s(), start=1):
            if outcome.code() != grpc.StatusCode.UNAVAILABLE:
                return outcome
            if deadline is not None and time.monotonic() + backoff_s >= deadline:
                return outcome
            logger.warning(
                "%s failed with UNAVAILABLE (%s); retry %d of %d in %.2f s",
                method,
                outcome.details(),
                retry,
                self.policy.max_retries,
                backoff_s,
            )
            time.sleep(backoff_s)
            details = client_call_details
            if deadline is not None:
                details = _with_timeout(client_call_details, deadline - time.monotonic())
            outcome = continuation(details, request)
        return outcome


def _with_timeout(details: grpc.ClientCallDetails, timeout_s: float) -> grpc.ClientCallDetails:
    replaced = _CallDetails()
    replaced.method = details.method
    replaced.timeout = timeout_s
    replaced.metadata = details.metadata
    replaced.credentials = details.credentials
    replaced.wait_for_ready = details.wait_for_ready
    replaced.compression = details.compression
    return replaced


class _CallDetails(grpc.ClientCallDetails):
    pass
