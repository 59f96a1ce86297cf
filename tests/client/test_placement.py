"""Sessions across several trainers without a scheduler: placement by free device memory, listing
across trainers and routing of the calls about one session."""

import contextlib
import io
import threading
import time

import grpc
import pytest

from lasagne_engine.client import (
    Engine,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from lasagne_engine.client.placement import TrainerCapacity, capacity, placement_order, trainer_addresses
from lasagne_engine.v1 import trainer_pb2, trainer_pb2_grpc
from tests.conftest import free_port

GIB = 1 << 30


class FakeTrainer(trainer_pb2_grpc.TrainerServicer):
    """A trainer that reports fixed devices and records the sessions it was asked to start."""

    def __init__(self, name: str, devices: list[trainer_pb2.Device], *, reject: grpc.StatusCode | None = None):
        self.name = name
        self.devices = devices
        self.reject = reject
        self.sessions: dict[str, trainer_pb2.Session] = {}
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def _record(self, method: str) -> None:
        with self._lock:
            self.calls.append(method)

    def GetDevices(self, request, context):
        self._record("GetDevices")
        return trainer_pb2.GetDevicesResponse(devices=self.devices)

    def StartSession(self, request, context):
        self._record("StartSession")
        if self.reject is not None:
            context.abort(self.reject, f"{self.name} cannot take it")
        session = trainer_pb2.Session(id=f"s-{self.name}-{len(self.sessions)}", model=request.model,
                                      device=request.device or self.devices[0].name, state=trainer_pb2.QUEUED)
        session.created_at.FromNanoseconds(time.time_ns())
        self.sessions[session.id] = session
        return session

    def ListSessions(self, request, context):
        self._record("ListSessions")
        return trainer_pb2.ListSessionsResponse(sessions=list(self.sessions.values()))

    def GetSession(self, request, context):
        self._record("GetSession")
        if request.id not in self.sessions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"No session {request.id!r}")
        return self.sessions[request.id]

    def StopSession(self, request, context):
        self._record("StopSession")
        session = self.sessions[request.id]
        session.state = trainer_pb2.STOPPED
        return session


def device(name: str, budget: int, used: int = 0, sessions: tuple[str, ...] = ()) -> trainer_pb2.Device:
    return trainer_pb2.Device(name=name, kind=name.split(":")[0], memory_budget_bytes=budget,
                              memory_used_bytes=used, session_ids=list(sessions))


@pytest.fixture
def trainers(serve):
    """Start fake trainers and return an Engine over all of them."""
    engines = []

    def start(*fakes: FakeTrainer, extra_addresses: tuple[str, ...] = ()) -> Engine:
        addresses = [serve((trainer_pb2_grpc.add_TrainerServicer_to_server, fake)) for fake in fakes]
        engine = Engine(registry_address="127.0.0.1:1", data_address="127.0.0.1:1",
                        trainer_addresses=[*addresses, *extra_addresses], timeout_s=5.0, max_retries=0)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.close()


def unused_address() -> str:
    """Return a loopback address where nothing listens."""
    return f"127.0.0.1:{free_port()}"


# Choosing an order --------------------------------------------------------------------------------


def test_order_prefers_idle_device_with_most_memory():
    capacities = [
        TrainerCapacity("a:1", idle_free_bytes=2 * GIB, free_bytes=2 * GIB),
        TrainerCapacity("b:1", idle_free_bytes=None, free_bytes=70 * GIB),
        TrainerCapacity("c:1", idle_free_bytes=8 * GIB, free_bytes=8 * GIB),
        TrainerCapacity("d:1", idle_free_bytes=None, free_bytes=10 * GIB),
    ]

    assert placement_order(capacities) == ["c:1", "a:1", "b:1", "d:1"]


def test_order_keeps_given_order_on_ties():
    capacities = [TrainerCapacity(f"t{index}:1", idle_free_bytes=GIB, free_bytes=GIB) for index in range(3)]

    assert placement_order(capacities) == ["t0:1", "t1:1", "t2:1"]


def test_capacity_counts_budget_less_use():
    response = trainer_pb2.GetDevicesResponse(devices=[
        device("gpu:0", 16 * GIB, used=10 * GIB, sessions=("s-1",)),
        device("gpu:1", 12 * GIB),
    ])

    assert capacity("a:1", response) == TrainerCapacity("a:1", idle_free_bytes=12 * GIB, free_bytes=12 * GIB)
    assert capacity("a:1", response, "gpu:0") == TrainerCapacity("a:1", idle_free_bytes=None, free_bytes=6 * GIB)
    assert capacity("a:1", response, "gpu:7") is None


def test_addresses_from_argument_and_environment():
    assert trainer_addresses(None, ["a:1", "b:1"], {}) == ("a:1", "b:1")
    assert trainer_addresses(None, None, {"LASAGNE_ENGINE_TRAINER_ADDRESSES": " a:1, b:1 ,"}) == ("a:1", "b:1")
    assert trainer_addresses("a:1", None, {"LASAGNE_ENGINE_TRAINER_ADDRESSES": "b:1,c:1"}) is None
    assert trainer_addresses(None, None, {}) is None
    assert trainer_addresses("b:1", ["a:1", "b:1"], {}) == ("a:1", "b:1")


@pytest.mark.parametrize(
    ("trainer_address", "addresses", "message"),
    [
        (None, [], "trainer_addresses is empty"),
        (None, ["a:1", "a:1"], "lists 'a:1' more than once"),
        (None, "a:1,b:1", "must be a list of host:port strings, not one string"),
        ("c:1", ["a:1", "b:1"], r"trainer_address='c:1' is not in trainer_addresses \['a:1', 'b:1'\]"),
    ],
    ids=["empty", "repeated", "string", "outside"],
)
def test_addresses_reject_bad_lists(trainer_address, addresses, message):
    with pytest.raises(ValueError, match=message):
        trainer_addresses(trainer_address, addresses, {})


def test_engine_defaults_trainer_to_first_address():
    with Engine(registry_address="r:1", data_address="d:1", trainer_addresses=["t:1", "t:2"]) as engine:
        assert engine.addresses.trainer == "t:1"
        assert engine.trainer_addresses == ("t:1", "t:2")
    with Engine(registry_address="r:1", data_address="d:1", trainer_address="t:9") as engine:
        assert engine.trainer_addresses == ("t:9",)


# Placing, listing and routing against fake trainers --------------------------------------------


def test_start_places_on_most_free_idle_device(trainers):
    small = FakeTrainer("small", [device("gpu:0", 8 * GIB)])
    busy = FakeTrainer("busy", [device("gpu:0", 80 * GIB, used=10 * GIB, sessions=("s-x",))])
    large = FakeTrainer("large", [device("gpu:0", 40 * GIB), device("gpu:1", 24 * GIB)])
    engine = trainers(small, busy, large)

    session = engine.start_session("mlp", "digits")

    assert session.id == "s-large-0"
    assert [fake.calls.count("StartSession") for fake in (small, busy, large)] == [0, 0, 1]
    assert [fake.calls.count("GetDevices") for fake in (small, busy, large)] == [1, 1, 1]


def test_start_tries_next_trainer_when_rejected(trainers):
    first = FakeTrainer("first", [device("gpu:0", 40 * GIB)], reject=grpc.StatusCode.RESOURCE_EXHAUSTED)
    second = FakeTrainer("second", [device("gpu:0", 16 * GIB)])

    session = trainers(first, second).start_session("mlp", "digits")

    assert session.id == "s-second-0"
    assert first.calls.count("StartSession") == 1


def test_start_skips_unreachable_trainer(trainers, caplog):
    reachable = FakeTrainer("up", [device("cpu:0", GIB)])
    missing = unused_address()
    engine = trainers(reachable, extra_addresses=(missing,))

    session = engine.start_session("mlp", "digits")

    assert session.id == "s-up-0"
    assert f"Trainer {missing} cannot be reached" in caplog.text


def test_start_fails_when_every_trainer_rejects(trainers):
    first = FakeTrainer("first", [device("gpu:0", 4 * GIB)], reject=grpc.StatusCode.RESOURCE_EXHAUSTED)
    second = FakeTrainer("second", [device("gpu:0", 2 * GIB)], reject=grpc.StatusCode.RESOURCE_EXHAUSTED)
    engine = trainers(first, second)

    with pytest.raises(ResourceExhaustedError, match="No trainer took the session.*first cannot take it.*"
                                                      "second cannot take it") as error_info:
        engine.start_session("mlp", "digits")

    assert error_info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_start_with_device_uses_trainers_that_have_it(trainers):
    cpu_only = FakeTrainer("cpu", [device("cpu:0", 64 * GIB)])
    gpu = FakeTrainer("gpu", [device("gpu:0", 16 * GIB)])
    engine = trainers(cpu_only, gpu)

    session = engine.start_session("mlp", "digits", device="gpu:0")

    assert session.id == "s-gpu-0"
    with pytest.raises(NotFoundError, match="No trainer has a device 'gpu:7'"):
        engine.start_session("mlp", "digits", device="gpu:7")


def test_list_merges_trainers_and_routes_by_session(trainers):
    first = FakeTrainer("first", [device("cpu:0", GIB)])
    second = FakeTrainer("second", [device("cpu:0", GIB)])
    engine = trainers(first, second)
    first.StartSession(trainer_pb2.StartSessionRequest(model="a"), None)
    second.StartSession(trainer_pb2.StartSessionRequest(model="b"), None)
    first.StartSession(trainer_pb2.StartSessionRequest(model="c"), None)

    listed = engine.list_sessions()
    stopped = engine.stop_session("s-second-0")

    assert [session.id for session in listed] == ["s-first-0", "s-second-0", "s-first-1"]
    assert stopped.state == trainer_pb2.STOPPED
    assert second.calls.count("StopSession") == 1
    assert first.calls.count("StopSession") == 0
    assert first.calls.count("GetSession") == second.calls.count("GetSession") == 0


def test_get_asks_each_trainer_once(trainers):
    first = FakeTrainer("first", [device("cpu:0", GIB)])
    second = FakeTrainer("second", [device("cpu:0", GIB)])
    engine = trainers(first, second)
    second.StartSession(trainer_pb2.StartSessionRequest(model="b"), None)

    engine.get_session("s-second-0")
    engine.get_session("s-second-0")

    assert first.calls.count("GetSession") == 1
    assert second.calls.count("GetSession") == 3
    with pytest.raises(NotFoundError, match=r"No session 's-none' on any of the trainers 127\.0\.0\.1:\d+, 127"):
        engine.get_session("s-none")


def test_get_reports_unreachable_trainer(trainers):
    reachable = FakeTrainer("up", [device("cpu:0", GIB)])
    missing = unused_address()
    engine = trainers(reachable, extra_addresses=(missing,))

    with pytest.raises(UnavailableError, match=f"these could not be reached: {missing}"):
        engine.get_session("s-elsewhere")


def test_metrics_of_sessions_on_two_trainers_rejected(trainers):
    first = FakeTrainer("first", [device("cpu:0", GIB)])
    second = FakeTrainer("second", [device("cpu:0", GIB)])
    engine = trainers(first, second)
    first.StartSession(trainer_pb2.StartSessionRequest(model="a"), None)
    second.StartSession(trainer_pb2.StartSessionRequest(model="b"), None)

    with pytest.raises(InvalidArgumentError, match="run on different trainers"):
        engine.watch_metrics(["s-first-0", "s-second-0"])
    with pytest.raises(InvalidArgumentError, match="name the sessions whose metrics to watch"):
        engine.watch_metrics()


# Three real trainers ---------------------------------------------------------------------------


@pytest.mark.slow
def test_three_trainers_place_and_list(tmp_path, compile_cache, monkeypatch):
    from lasagne_engine import rpc
    from lasagne_engine.client.cli import main as cli_main
    from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
    from lasagne_engine.data_service import add_data_service
    from lasagne_engine.model_registry import add_model_registry
    from lasagne_engine.trainer import add_trainer
    from lasagne_engine.trainer.devices import cpu_devices

    registry = rpc.Server("127.0.0.1:0")
    add_model_registry(registry, root=tmp_path / "registry", compile_cache=compile_cache)
    data = rpc.Server("127.0.0.1:0")
    add_data_service(data, root=tmp_path / "data")
    budgets = {"one": 1 * GIB, "three": 3 * GIB, "two": 2 * GIB}
    servers, servicers = {}, {}
    for name, budget in budgets.items():
        servers[name] = rpc.Server("127.0.0.1:0")
        servicers[name] = add_trainer(servers[name], root=tmp_path / name, registry_address=registry.address,
                                      data_address=data.address, compile_cache=compile_cache,
                                      devices=cpu_devices(1, memory_budget_bytes=budget))
    for server in (registry, data, *servers.values()):
        server.start()
    addresses = [servers[name].address for name in budgets]
    engine = Engine(registry_address=registry.address, data_address=data.address, trainer_addresses=addresses)
    try:
        engine.upload_dataset("digits", digits_split())
        engine.register_model("mlp", MODEL_SOURCE.read_text(), default_hyperparameters={"hidden_units": 32})

        started = [engine.start_session("mlp", "digits", epochs=100_000, batch_size=8) for _ in budgets]

        placed = {session.id: name for name in budgets for session in servicers[name].manager.list([])}
        assert [placed[session.id] for session in started] == ["three", "two", "one"]
        assert [engine.get_session(session.id).device for session in started] == ["cpu:0"] * 3
        monkeypatch.setenv("LASAGNE_ENGINE_REGISTRY_ADDRESS", registry.address)
        monkeypatch.setenv("LASAGNE_ENGINE_DATA_ADDRESS", data.address)
        monkeypatch.setenv("LASAGNE_ENGINE_TRAINER_ADDRESSES", ",".join(addresses))
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            assert cli_main(["sessions"]) == 0
        for session in started:
            assert session.id in output.getvalue()
        assert {session.id for session in engine.list_sessions()} == {session.id for session in started}

        for session in started:
            engine.stop_session(session.id)
        # Generous: on a fresh machine this is the suite's first training, so Numba compiles cold.
        finals = [engine.wait_session(session.id, timeout_s=600) for session in started]
        assert [final.state for final in finals] == [trainer_pb2.STOPPED] * 3
    finally:
        engine.close()
        for servicer in servicers.values():
            servicer.manager.close()
        for server in (*servers.values(), data, registry):
            server.stop(grace_s=1.0)
