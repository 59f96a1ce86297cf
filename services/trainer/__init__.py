"""The Trainer service: training sessions, each in a process of its own, pinned to one device."""

from lasagne_engine.trainer.server import add_trainer, create_server

__all__ = ["add_trainer", "create_server"]
