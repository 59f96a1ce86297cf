#!/bin/sh
# Print the path of a Python 3.12 or newer interpreter that runs, or fail with a message.
# Checks $PYTHON, then python3.13, python3.12 and python3 on PATH, then pyenv's versions, since a
# pyenv shim can exist on PATH for a version that is installed but not selected.
for candidate in "$PYTHON" python3.13 python3.12 python3 "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
        "$candidate" -c 'import sys; print(sys.executable)'
        exit 0
    fi
done
echo "No Python 3.12 or newer found; install one or set PYTHON=/path/to/python3.12." >&2
exit 1
