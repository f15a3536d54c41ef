"""Tests of pet_sweep.launch."""
