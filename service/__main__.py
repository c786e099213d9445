"""`python -m cxr_triage ...` runs the CLI."""

from cxr_triage.cli import main

main()
