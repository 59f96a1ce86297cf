"""Checking model definitions by building them in a subprocess, never in the service itself."""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

from lasagne_engine.compute import compute_environment
from lasagne_engine.modeldef import ERROR_TAIL_LINES, ModelDefinitionError, error_tail

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 180.0
SIGNATURE_KEYS = ("input_shape", "input_dtype", "output_shape", "loss", "parameters", "parameter_bytes")


def check_definition(
    name: str,
    source: str,
    hyperparameters: dict,
    *,
    compile_cache: pathlib.Path,
    python_executable: str = sys.executable,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict:
    """Build a model definition in a subprocess and return its signature.

    Runs ``python_executable -m lasagne_engine.modeldef`` with the PyTensor environment of
    :func:`lasagne_engine.compute.compute_environment`, in an empty temporary working folder, and
    sends it ``{"name", "source", "hyperparameters"}`` as JSON on standard input.

    Parameters
    ----------
    name : str
        Model name, used in error messages and in the definition's module name.
    source : str
        Python source defining ``build(hyperparameters)``.
    hyperparameters : dict
        JSON-serializable hyperparameters passed to ``build``.
    compile_cache : pathlib.Path
        PyTensor's and JAX's compile cache folder, shared with the sessions that train the model.
    python_executable : str
        Interpreter that has ``lasagne_engine`` and PyTensor installed. Default ``sys.executable``.
    timeout_s : float
        Seconds the build may take before its process group is killed. Default 180.

    Returns
    -------
    dict
        The signature, with the keys of ``ModelSignature`` in the registry's protos.

    Raises
    ------
    ModelDefinitionError
        If the subprocess exits with an error, times out, or prints no signature. The message ends
        with the last lines of its standard error.
    """
    request = json.dumps({"name": name, "source": source, "hyperparameters": hyperparameters})
    environment = compute_environment(compile_cache)
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="lasagne-engine-check-") as working_folder:
        # A session of its own, so that a timeout kills the compilers the build started as well.
        process = subprocess.Popen(
            [python_executable, "-m", "lasagne_engine.modeldef"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            cwd=working_folder,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(request, timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise ModelDefinitionError(
                f"Checking model definition {name!r} timed out after {timeout_s:g} s and was stopped; "
                f"make build() faster or raise the check timeout. Last output:\n{error_tail(stderr)}"
            ) from error

    elapsed_s = time.monotonic() - started
    if process.returncode != 0:
        if process.returncode == 2:
            # modeldef exits with 2 after printing one line about the definition followed by at
            # most ERROR_TAIL_LINES lines of its traceback.
            raise ModelDefinitionError(error_tail(stderr, ERROR_TAIL_LINES + 1))
        if process.returncode < 0:
            outcome = f"was killed by signal {-process.returncode}"
        else:
            outcome = f"failed with exit code {process.returncode}"
        raise ModelDefinitionError(f"Checking model definition {name!r} {outcome}:\n{error_tail(stderr)}")

    signature = _parse_signature(stdout)
    if signature is None:
        raise ModelDefinitionError(
            f"Checking model definition {name!r} printed no signature; its last output was:\n"
            f"{error_tail(stdout + stderr)}"
        )
    logger.info("Checked model definition %r in %.1f s", name, elapsed_s)
    return signature


def _parse_signature(stdout: str) -> dict | None:
    # modeldef prints the signature last, after anything build() printed, and without a newline.
    lines = stdout.strip().splitlines()
    if not lines:
        return None
    try:
        signature = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    if not isinstance(signature, dict) or any(key not in signature for key in SIGNATURE_KEYS):
        return None
    return signature


class DefinitionChecker:
    """Checks model definitions with :func:`check_definition`, a bounded number at a time.

    Parameters
    ----------
    compile_cache : pathlib.Path
        PyTensor's and JAX's compile cache folder.
    python_executable : str
        Interpreter that runs the checks. Default ``sys.executable``.
    timeout_s : float
        Seconds each check may take. Default 180.
    max_concurrent : int, optional
        Checks that run at once; further ones wait their turn before their timeout starts.
        Default the number of CPUs.
    """

    def __init__(
        self,
        *,
        compile_cache: pathlib.Path,
        python_executable: str = sys.executable,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_concurrent: int | None = None,
    ):
        self.compile_cache = pathlib.Path(compile_cache)
        self.python_executable = python_executable
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_concurrent or os.cpu_count() or 1)

    def __call__(self, name: str, source: str, hyperparameters: dict) -> dict:
        """Check one definition and return its signature; see :func:`check_definition`."""
        with self._slots:
            return check_definition(
                name,
                source,
                hyperparameters,
                compile_cache=self.compile_cache,
                python_executable=self.python_executable,
                timeout_s=self.timeout_s,
            )
