"""The model names this host serves (``--model NAME[=ENGINE_MODEL]``) and the engine's behind them.

The marketplace knows a model by its own name (the SDK sends e.g. ``"repo:file"`` or
``"tinyllama"``), the engine by its file or alias. Each shell asks :meth:`ModelNames.engine_model`
which engine model serves a requested name, and sends that one upstream. Without ``--model``
the engine's own names are the host's names, and the engine judges what it serves.
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.errors import BadRequest


class ModelNotServed(BadRequest):
    status = 404
    code = "model_not_found"


class ModelNames:
    def __init__(self, names: Mapping[str, str]) -> None:
        self._names = dict(names)

    @property
    def configured(self) -> bool:
        return bool(self._names)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)

    def engine_model(self, requested: str, engine_models: tuple[str, ...] = ()) -> str:
        """The engine model that serves ``requested``, or :class:`ModelNotServed`.

        With ``--model``, only the names given (and the engine models they map to) are served.
        Without, ``engine_models`` (when the engine lists any) are."""
        if self._names:
            if requested in self._names:
                return self._names[requested]
            if requested in self._names.values():
                return requested
            served = self.names
        elif not engine_models or requested in engine_models:
            return requested
        else:
            served = engine_models
        shown = requested if len(requested) <= 80 else requested[:77] + "..."
        raise ModelNotServed(
            f"model {shown!r} is not served here; models: {', '.join(served)}", param="model"
        )
