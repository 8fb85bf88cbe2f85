"""FAKE supervision rule for tests/test_tmux.py: on PYTHONPATH, every Python process of the sweep (the
`run`, each supervisor) restarts a crashed worker after 7 s, changed in the one place the rule lives."""
from orchestrator.supervision import Policy

Policy.restart_delay = lambda self, crashes_in_row: 7.0
