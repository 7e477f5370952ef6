"""`python -m diffprune` runs the command line."""

from diffprune.cli import main

raise SystemExit(main())
