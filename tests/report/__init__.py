"""Tests of pet_sweep.report."""
