"""Generate the Python gRPC code in common/v1 from the contracts in protos/.

Run with ``make protos``. The test suite regenerates into a temporary folder and fails when the
committed code differs, so every change to a .proto file must be followed by this command.
"""

import argparse
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = REPOSITORY_ROOT / "protos"
PACKAGE_PROTO_DIR = PROTO_ROOT / "lasagne_engine" / "v1"
OUTPUT_DIR = REPOSITORY_ROOT / "common" / "v1"


def generate(output_dir: pathlib.Path) -> None:
    """Write the *_pb2.py, *_pb2.pyi and *_pb2_grpc.py modules for every proto into output_dir."""
    well_known_protos = pathlib.Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = pathlib.Path(scratch)
        proto_files = sorted(PACKAGE_PROTO_DIR.glob("*.proto"))
        arguments = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known_protos}",
            f"--python_out={scratch_path}",
            f"--pyi_out={scratch_path}",
            f"--grpc_python_out={scratch_path}",
            *(str(path) for path in proto_files),
        ]
        if protoc.main(arguments) != 0:
            raise SystemExit("protoc failed; see its output above")

        # protoc mirrors the proto package as folders (lasagne_engine/v1); the code lives in
        # common/v1, which the install maps to the lasagne_engine.v1 package.
        generated = scratch_path / "lasagne_engine" / "v1"
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob("*_pb2*.py*"):
            stale.unlink()
        for path in sorted(generated.iterdir()):
            shutil.copyfile(path, output_dir / path.name)
        (output_dir / "__init__.py").write_text('"""Code generated from protos/ by scripts/generate_protos.py."""\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUTPUT_DIR, help="output folder (default: common/v1)")
    arguments = parser.parse_args(argv)
    generate(arguments.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
