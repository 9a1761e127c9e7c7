"""``python -m medclf`` (also what ``torchrun -m medclf`` runs)."""

from medclf.cli import main

main()
