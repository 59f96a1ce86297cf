import pytest
from data_service_harness import RunningDataService, serve


@pytest.fixture
def data_service(tmp_path) -> RunningDataService:
    """A data service storing under ``tmp_path``, on a free port of 127.0.0.1, stopped after the test."""
    with serve(tmp_path) as service:
        yield service
