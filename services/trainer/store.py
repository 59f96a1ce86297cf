"""Session records in SQLite, so that sessions outlive the trainer process."""

import pathlib
import sqlite3
import threading

from lasagne_engine.v1 import trainer_pb2

# Sessions in these states have a process (or will have one); the rest are final.
LIVE_STATES = frozenset(
    {
        trainer_pb2.PENDING,
        trainer_pb2.QUEUED,
        trainer_pb2.LOADING,
        trainer_pb2.COMPILING,
        trainer_pb2.RUNNING,
        trainer_pb2.PAUSED,
    }
)
FINAL_STATES = frozenset(
    {
        trainer_pb2.COMPLETED,
        trainer_pb2.STOPPED,
        trainer_pb2.EARLY_STOPPED,
        trainer_pb2.FAILED,
        trainer_pb2.INTERRUPTED,
    }
)


class SessionStore:
    """Keeps each session as its serialized ``Session`` message, keyed by id."""

    def __init__(self, path: pathlib.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.execute(
            "CREATE TABLE IF NOT EXISTS sessions ("
            " id TEXT PRIMARY KEY, state INTEGER NOT NULL, created_at REAL NOT NULL, message BLOB NOT NULL)"
        )
        self._lock = threading.Lock()

    def put(self, session: trainer_pb2.Session) -> None:
        with self._lock:
            self._connection.execute(
                "INSERT INTO sessions (id, state, created_at, message) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET state = excluded.state, message = excluded.message",
                (session.id, session.state, session.created_at.ToNanoseconds() / 1e9, session.SerializeToString()),
            )

    def all(self) -> list[trainer_pb2.Session]:
        with self._lock:
            rows = self._connection.execute("SELECT message FROM sessions ORDER BY created_at, id").fetchall()
        return [trainer_pb2.Session.FromString(row[0]) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._connection.close()
