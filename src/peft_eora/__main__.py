"""``python -m peft_eora …`` runs the ``peft-eora`` command line (see :mod:`peft_eora.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
