"""The Trainer gRPC service: translates messages to and from the session manager."""

import logging
import threading

import grpc

from lasagne_engine.errors import InvalidArgument, grpc_errors
from lasagne_engine.trainer.manager import SessionManager
from lasagne_engine.v1 import trainer_pb2, trainer_pb2_grpc

logger = logging.getLogger(__name__)


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(self, manager: SessionManager):
        self.manager = manager

    @grpc_errors
    def StartSession(self, request, context):
        return self.manager.start(request)

    @grpc_errors
    def ListSessions(self, request, context):
        return trainer_pb2.ListSessionsResponse(sessions=self.manager.list(list(request.states)))

    @grpc_errors
    def GetSession(self, request, context):
        return self.manager.get(request.id)

    @grpc_errors
    def StopSession(self, request, context):
        return self.manager.stop(request.id)

    @grpc_errors
    def WatchSession(self, request, context):
        yield from self.manager.watch(request.id, is_active=context.is_active)

    @grpc_errors
    def PauseSession(self, request, context):
        return self.manager.pause(request.id, release=request.release)

    @grpc_errors
    def ResumeSession(self, request, context):
        return self.manager.resume(request.id)

    @grpc_errors
    def CheckpointSession(self, request, context):
        return trainer_pb2.CheckpointSessionResponse(parameter_set_id=self.manager.checkpoint(request.id))

    @grpc_errors
    def UpdateHyperparameters(self, request, context):
        learning_rate = request.learning_rate if request.HasField("learning_rate") else None
        return self.manager.update_hyperparameters(request.id, learning_rate=learning_rate)

    @grpc_errors
    def GetDevices(self, request, context):
        return self.manager.devices_status()

    @grpc_errors
    def WatchMetrics(self, request, context):
        yield from self.manager.watch_metrics(list(request.session_ids), is_active=context.is_active)

    @grpc_errors
    def AttachWorker(self, request_iterator, context):
        try:
            first = next(request_iterator)
        except StopIteration:
            raise InvalidArgument("The worker stream ended before its hello.") from None
        if first.WhichOneof("report") != "hello":
            raise InvalidArgument(f"The first worker report must be a hello, not {first.WhichOneof('report')!r}.")
        live = self.manager.attach(first.hello)
        session_id = first.hello.session_id
        yield trainer_pb2.WorkerCommand(start=live.spec)

        def read_reports() -> None:
            try:
                for report in request_iterator:
                    self.manager.report(session_id, report)
            except grpc.RpcError as error:
                logger.warning("Session %s: its report stream broke: %s", session_id, error)
            except Exception:  # noqa: BLE001 - a bad report must not kill the trainer
                logger.exception("Session %s: a report could not be applied", session_id)
            finally:
                self.manager.detach(session_id)

        reader = threading.Thread(target=read_reports, name=f"reports-{session_id}", daemon=True)
        reader.start()
        while True:
            command = live.commands.get()
            if command is None:
                break
            yield command
        reader.join(timeout=5)
