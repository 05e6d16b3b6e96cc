"""`python -m apix`: the same CLI as the `apix` command."""

from apix.cli import main

main()
