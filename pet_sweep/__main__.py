"""`python -m pet_sweep` is the `pet-sweep` command."""

from pet_sweep.cli import cli

if __name__ == "__main__":
    cli()
