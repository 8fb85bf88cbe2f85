#!/usr/bin/env python3
"""Entry point: `python run_experiment.py experiments/demo.yaml` (see README.md)."""
import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main())
