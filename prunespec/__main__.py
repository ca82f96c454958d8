"""`python -m prunespec` runs the command line."""

from prunespec.cli import main

main()
