"""`python -m service ...` runs the `cxr-triage` command."""

from service.cli import main

main()
