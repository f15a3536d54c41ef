"""Tests of pet_sweep.train."""
