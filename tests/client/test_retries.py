"""Which calls the SDK retries on UNAVAILABLE, how often, and the waits between attempts."""

import logging

import grpc
import pytest

from lasagne_engine.client import UnavailableError
from lasagne_engine.client.retries import RetryPolicy, is_idempotent
from lasagne_engine.v1 import data_service_pb2, data_service_pb2_grpc, model_registry_pb2, model_registry_pb2_grpc

# This folder's autouse fixture replaces the waits with zeros; the real schedule is kept here.
UNPATCHED_BACKOFFS_S = RetryPolicy.backoffs_s


class FlakyDataService(data_service_pb2_grpc.DataServiceServicer):
    """Fails each method with UNAVAILABLE ``failures`` times before it succeeds, counting the calls."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls: dict[str, int] = {}

    def _attempt(self, method: str, context) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{method} is briefly unavailable.")

    def ListDatasets(self, request, context):
        self._attempt("ListDatasets", context)
        return data_service_pb2.ListDatasetsResponse()

    def DeleteDataset(self, request, context):
        self._attempt("DeleteDataset", context)
        return data_service_pb2.DeleteDatasetResponse(deleted_versions=[1])


class FlakyRegistry(model_registry_pb2_grpc.ModelRegistryServicer):
    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    def TagParameterSet(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "The registry is restarting.")
        return model_registry_pb2.ParameterSet(id=request.id, tags=list(request.add_tags))


def test_listing_is_retried_until_it_succeeds(serve, connect, caplog):
    service = FlakyDataService(failures=3)
    engine = connect(serve((data_service_pb2_grpc.add_DataServiceServicer_to_server, service)))

    with caplog.at_level(logging.WARNING, logger="lasagne_engine.client.retries"):
        assert engine.list_datasets() == []

    assert service.calls["ListDatasets"] == 4
    assert "ListDatasets failed with UNAVAILABLE" in caplog.text
    assert "retry 3 of 5" in caplog.text


def test_listing_gives_up_after_max_retries(serve, connect):
    service = FlakyDataService(failures=100)
    engine = connect(serve((data_service_pb2_grpc.add_DataServiceServicer_to_server, service)))

    with pytest.raises(UnavailableError, match="ListDatasets is briefly unavailable"):
        engine.list_datasets()

    assert service.calls["ListDatasets"] == 6


def test_deletion_is_not_retried(serve, connect):
    service = FlakyDataService(failures=1)
    engine = connect(serve((data_service_pb2_grpc.add_DataServiceServicer_to_server, service)))

    with pytest.raises(UnavailableError):
        engine.delete_dataset("digits")

    assert service.calls["DeleteDataset"] == 1


def test_tagging_is_retried(serve, connect):
    service = FlakyRegistry(failures=2)
    engine = connect(serve((model_registry_pb2_grpc.add_ModelRegistryServicer_to_server, service)))

    tagged = engine.tag_parameter_set("ps-0123456789ab", add=["best"])

    assert list(tagged.tags) == ["best"]
    assert service.calls == 3


@pytest.mark.parametrize(
    ("method", "idempotent"),
    [
        ("/lasagne_engine.v1.DataService/ListDatasets", True),
        ("/lasagne_engine.v1.DataService/DownloadArray", True),
        ("/lasagne_engine.v1.ModelRegistry/TagParameterSet", True),
        ("/lasagne_engine.v1.Trainer/GetSession", True),
        ("/lasagne_engine.v1.DataService/UploadDataset", False),
        ("/lasagne_engine.v1.ModelRegistry/SaveParameterSet", False),
        ("/lasagne_engine.v1.ModelRegistry/DeleteParameterSet", False),
        ("/lasagne_engine.v1.Trainer/StartSession", False),
    ],
)
def test_idempotent_methods(method, idempotent):
    assert is_idempotent(method) is idempotent


def test_backoff_doubles_up_to_the_cap():
    waits = list(UNPATCHED_BACKOFFS_S(RetryPolicy(6)))

    caps = [0.25, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert len(waits) == 6
    for wait, cap in zip(waits, caps):
        assert 0.5 * cap <= wait <= cap


def test_no_retries():
    assert list(UNPATCHED_BACKOFFS_S(RetryPolicy(0))) == []
    with pytest.raises(ValueError, match="max_retries=-1"):
        RetryPolicy(-1)
