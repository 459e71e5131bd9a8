"""Django management commands of the kongtask app."""
