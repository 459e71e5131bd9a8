"""Integrations of kongtask with web frameworks (optional extras; the core never imports them)."""
