"""``python -m lab``: the lab command line (see ``lab.cli``)."""

from lab.cli import main

main()
