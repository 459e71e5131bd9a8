"""Fault, load and bad-input scenarios: what kongtask promises, proven from the database."""
