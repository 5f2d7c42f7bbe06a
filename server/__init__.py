"""HTTP frontend and command-line entry points."""
