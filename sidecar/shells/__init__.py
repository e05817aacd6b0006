"""The shells: thin adapters from what a client speaks to the one metering core.

Each parses what its client sent, asks :mod:`sidecar.exchange` for a metered engine call, and
formats what its client gets: the OpenAI routes (``openai_proxy``), the host node's HTTP routes
(``node_http``) and WebSocket session (``node_ws``) over the pure messages of ``node_protocol``,
and the operator's routes (``admin``).
"""
