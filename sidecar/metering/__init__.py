"""The metering core: bytes in, token counts out. Sans-IO: no sockets, no clock, no event loop."""

from sidecar.metering.types import Endpoint, Source, Usage

__all__ = ["Endpoint", "Source", "Usage"]
