"""`python -m orchestrator.sizing probe CONFIG.json INDEX`: one calibration probe process."""
import sys

from . import main

sys.exit(main())
