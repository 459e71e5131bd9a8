"""Settings and URLs of the kongtask Django example."""
