"""The web dashboard (work in progress)."""
