"""`python -m buildfarm` runs the command line."""

from buildfarm.cli import main

main()
