import time

import pytest

from lasagne_engine.model_registry.checker import DefinitionChecker, check_definition
from lasagne_engine.modeldef import ModelDefinitionError


def test_signature_despite_printing(compile_cache, model_source):
    source = model_source.replace("def build(hyperparameters):", "def build(hyperparameters):\n    print('building')")

    signature = check_definition("digits", source, {"hidden_units": 16}, compile_cache=compile_cache)

    assert signature["input_shape"] == [64]
    assert signature["parameter_bytes"] == (64 * 16 + 16 + 16 * 10 + 10) * 4


def test_timeout(compile_cache):
    started = time.monotonic()

    with pytest.raises(ModelDefinitionError, match=r"'slow' timed out after 2 s and was stopped"):
        check_definition("slow", "import time\ntime.sleep(60)\n", {}, compile_cache=compile_cache, timeout_s=2)

    assert time.monotonic() - started < 30


def test_exit_code(compile_cache):
    with pytest.raises(ModelDefinitionError, match=r"'exits' failed with exit code 3"):
        check_definition("exits", "import os\nos._exit(3)\n", {}, compile_cache=compile_cache)


def test_killed_by_signal(compile_cache):
    source = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"

    with pytest.raises(ModelDefinitionError, match=r"'killed' was killed by signal 9"):
        check_definition("killed", source, {}, compile_cache=compile_cache)


def test_deep_traceback_keeps_first_line(compile_cache):
    source = (
        "def nested(depth):\n"
        "    if depth == 0:\n"
        "        raise RuntimeError('out of layers')\n"
        "    nested(depth - 1)\n"
        "\n"
        "def build(hyperparameters):\n"
        "    nested(20)\n"
    )

    with pytest.raises(ModelDefinitionError) as caught:
        DefinitionChecker(compile_cache=compile_cache, max_concurrent=1)("deep", source, {})

    lines = str(caught.value).splitlines()
    assert lines[0].startswith("Model definition 'deep' failed to build")
    assert lines[-1] == "RuntimeError: out of layers"
