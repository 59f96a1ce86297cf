import filecmp
import pathlib
import subprocess
import sys

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_code_matches_protos(tmp_path):
    subprocess.run(
        [sys.executable, str(REPOSITORY_ROOT / "scripts" / "generate_protos.py"), "--out", str(tmp_path)],
        check=True,
    )
    committed = REPOSITORY_ROOT / "common" / "v1"

    generated_names = sorted(path.name for path in tmp_path.iterdir())
    committed_names = sorted(path.name for path in committed.iterdir() if path.is_file() and path.suffix in {".py", ".pyi"})
    assert generated_names == committed_names, "run 'make protos': the set of generated files changed"
    _, mismatched, errors = filecmp.cmpfiles(tmp_path, committed, generated_names, shallow=False)
    assert not errors
    assert mismatched == [], f"run 'make protos': {mismatched} are older than protos/"
