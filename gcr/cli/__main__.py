"""`python -m gcr.cli`: the same as the `gcr` command."""
from gcr.cli import main

main()
