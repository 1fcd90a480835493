"""`python -m zimage_server ...` is the `zimage-server` command."""

from .cli import main

main()
