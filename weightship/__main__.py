"""``python -m weightship`` runs the CLI."""

from weightship.cli.app import main

main()
