import shutil

import pytest

from lasagne_engine.client.demo import MODEL_SOURCE, digits_split
from lasagne_engine.trainer.devices import DeviceInfo, cpu_devices
from lasagne_engine.v1 import trainer_pb2
from tests.conftest import Stack

pytestmark = pytest.mark.slow


def run_one_session(stack: Stack, **options) -> trainer_pb2.Session:
    stack.engine.upload_dataset("digits", digits_split())
    stack.engine.register_model("mlp", MODEL_SOURCE.read_text(), default_hyperparameters={"hidden_units": 32})
    session = stack.engine.start_session("mlp", "digits", epochs=3, batch_size=64, learning_rate=0.01, **options)
    return stack.engine.wait_session(session.id, timeout_s=300)


def test_jax_backend_session_on_cpu(tmp_path, compile_cache):
    stack = Stack(tmp_path, compile_cache, backend="jax", devices=cpu_devices(1, memory_budget_bytes=1 << 30))
    try:
        final = run_one_session(stack)
    finally:
        stack.stop()

    assert final.state == trainer_pb2.COMPLETED, final.error
    assert final.backend == "jax"
    assert final.epochs[-1].metrics["val_accuracy"] > 0.85


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA GPU on this host")
def test_gpu_session_uses_jax_on_its_device(tmp_path, compile_cache):
    gpu = DeviceInfo(name="gpu:0", kind="gpu", memory_budget_bytes=8 << 30)
    stack = Stack(tmp_path, compile_cache, backend="auto", devices=[gpu])
    try:
        final = run_one_session(stack)
    finally:
        stack.stop()

    assert final.state == trainer_pb2.COMPLETED, final.error
    assert final.device == "gpu:0"
    assert final.backend == "jax"
    assert final.epochs[-1].metrics["val_accuracy"] > 0.85
