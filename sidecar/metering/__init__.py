"""The metering core: bytes in, token counts out. Sans-IO: no sockets, no clock, no event loop."""

from sidecar.metering.jobs import InvalidJobId, parse_job_id, resolve_job_id
from sidecar.metering.requests import InvalidRequestBody, PreparedRequest, prepare_request
from sidecar.metering.sse import DEFAULT_MAX_EVENT_BYTES, DONE, SSEDecoder, SSEEvent, Truncated
from sidecar.metering.types import Endpoint, Source, Usage
from sidecar.metering.usage import StreamMeter, read_usage, usage_from_body

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "DONE",
    "Endpoint",
    "InvalidJobId",
    "InvalidRequestBody",
    "PreparedRequest",
    "SSEDecoder",
    "SSEEvent",
    "Source",
    "StreamMeter",
    "Truncated",
    "Usage",
    "parse_job_id",
    "prepare_request",
    "read_usage",
    "resolve_job_id",
    "usage_from_body",
]
