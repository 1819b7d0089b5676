"""Drives both sides, compares, reports, tabulates and times. Framework-free at import time."""
