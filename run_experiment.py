#!/usr/bin/env python3
"""Entry point: `python run_experiment.py experiments/demo.yaml` (see README.md)."""
import os
import sys

try:
    from orchestrator.cli import main
except ModuleNotFoundError as exc:  # a python outside the project's .venv (a fresh shell's `python3`)
    if (exc.name or "").split(".")[0] == "orchestrator":
        raise  # the package itself is broken: that traceback is the one to read
    def shown(name, prefix=""):  # as typed in this folder: relative below it, else the full path
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
        return path if os.path.relpath(path).startswith("..") else prefix + os.path.relpath(path)
    made = "" if os.path.isfile(os.path.join(shown(".venv"), "bin", "activate")) else "; there is none yet"
    print(f"error: {sys.executable} lacks the packages this needs ({exc}): run `source {shown('.venv')}/bin/activate` "
          f"first ({shown('demo.sh', './')} or {shown('run_tests.sh', './')} creates that venv{made})", file=sys.stderr)
    sys.exit(1)

if __name__ == "__main__":
    sys.exit(main())
