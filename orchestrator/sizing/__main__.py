"""`python -m orchestrator.sizing probe CONFIG.json INDEX`: one calibration probe process."""
import sys

from .calibration import main

sys.exit(main())
