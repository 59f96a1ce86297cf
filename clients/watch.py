"""Following several sessions' watch streams at once, for ``lasagne-engine watch``."""

import contextlib
import queue
import threading
from collections.abc import Sequence

from lasagne_engine.client.engine import Engine
from lasagne_engine.client.errors import EngineError
from lasagne_engine.client.progress import ProgressView

__all__ = ["watch_sessions"]

# How often the view is redrawn without new events, so the time left keeps counting down.
REDRAW_EVERY_S = 1.0
_STREAM_ENDED = object()


def watch_sessions(
    engine: Engine, session_ids: Sequence[str], view: ProgressView, *, redraw_every_s: float = REDRAW_EVERY_S
) -> dict[str, EngineError]:
    """Feed every session's events to ``view`` until each stream ends; return the streams' errors.

    One thread per session reads its :meth:`Engine.watch_session` stream, and this thread draws,
    so the view is only ever touched here. A stream ends when its session reaches a final state,
    or with an error, which is returned by session id instead of being raised, so the other
    sessions stay in view.
    """
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def follow(session_id: str) -> None:
        try:
            with contextlib.closing(engine.watch_session(session_id)) as stream:
                for event in stream:
                    events.put((session_id, event))
                    if stop.is_set():
                        return
        except EngineError as error:
            events.put((session_id, error))
        finally:
            events.put((session_id, _STREAM_ENDED))

    view.add(session_ids)
    readers = [
        threading.Thread(target=follow, args=(session_id,), name=f"watch-{session_id}", daemon=True)
        for session_id in session_ids
    ]
    for reader in readers:
        reader.start()

    errors: dict[str, EngineError] = {}
    open_streams = set(session_ids)
    try:
        while open_streams:
            try:
                session_id, item = events.get(timeout=redraw_every_s)
            except queue.Empty:
                view.redraw()
                continue
            if item is _STREAM_ENDED:
                open_streams.discard(session_id)
            elif isinstance(item, EngineError):
                errors[session_id] = item
            else:
                view.update(session_id, item)
    finally:
        # On an interrupt the readers stop at their next event; closing the engine cancels them.
        stop.set()
    return errors
