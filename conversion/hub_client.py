"""Requests to the Hugging Face Hub that give up in time.

huggingface_hub 2.x sends every request through one shared HTTP client, which has no timeout of its own, and some
of its calls pass none. Inside `hub_requests_time_out(seconds)` every request it sends (API calls, downloads,
uploads to storage) gives up after `seconds` without an answer, with a `HubTimeout` that huggingface_hub does not
retry. Used by publishing and by the conversion's download of a vision tower.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from huggingface_hub import set_client_factory
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

DEFAULT_TIMEOUT_S = 60.0


class HubTimeout(httpx2.TransportError):
    """A request got no answer in time. Not one of the errors huggingface_hub retries: the command stops at once."""


class TimeLimitedClient(httpx2.Client):
    """An HTTP client that sends every request with the client's timeout, whatever timeout the caller passed."""

    def send(self, request: httpx2.Request, **kwargs) -> httpx2.Response:
        request.extensions["timeout"] = self.timeout.as_dict()
        try:
            return super().send(request, **kwargs)
        except httpx2.TimeoutException as err:
            raise HubTimeout(f"no answer within {self.timeout.read:g} s", request=request) from err


def check_timeout(timeout: float) -> float:
    """`timeout` as a positive number of seconds; a ValueError otherwise."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


@contextmanager
def hub_requests_time_out(seconds: float) -> Iterator[None]:
    """Makes every request huggingface_hub sends give up after `seconds` without an answer."""
    seconds = check_timeout(seconds)

    def client_factory() -> httpx2.Client:
        hooks = {"request": [hf_request_event_hook]}
        return TimeLimitedClient(event_hooks=hooks, follow_redirects=True, timeout=seconds)

    set_client_factory(client_factory)
    try:
        yield
    finally:
        set_client_factory(default_client_factory)


def timed_out_server(error: HubTimeout, endpoint: str) -> str:
    """The server that did not answer: `endpoint`, or the storage origin the Hub at `endpoint` sent the request to."""
    url = error.request.url
    origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
    return endpoint if endpoint.startswith(origin) else f"{origin} (storage of the Hub at {endpoint})"


__all__ = ["DEFAULT_TIMEOUT_S", "HubTimeout", "TimeLimitedClient", "check_timeout", "hub_requests_time_out"]
