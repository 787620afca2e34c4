"""Tests of the sample scenarios (samples/*)."""
