"""Integrations of kongtask with frameworks; nothing in kongtask's core imports this package."""
