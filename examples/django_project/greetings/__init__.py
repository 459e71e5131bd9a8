"""An app whose task records greetings in a table."""
