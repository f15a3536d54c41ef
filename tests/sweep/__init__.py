"""Tests of pet_sweep.sweep."""
