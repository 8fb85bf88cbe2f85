"""wan-sweep: batch orchestration of prompt × seed sweeps of Wan 2.x video models.

manifest → jobs → plan → executor → supervisor → worker → backend → mp4 + sidecar, ledger → report
"""
__version__ = "0.1.0"
