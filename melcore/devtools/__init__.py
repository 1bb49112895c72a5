"""Helpers for developing melreview (test fixtures, benchmarks); not used by the app itself."""
