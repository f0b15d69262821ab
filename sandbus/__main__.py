"""``python -m sandbus``: the ``sandbus`` command."""

from sandbus.host.cli import main

main()
