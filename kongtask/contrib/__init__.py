"""Optional integrations with other libraries, each behind its own extra.

kongtask's core never imports this package: an integration is switched on by
the application importing it (``kongtask.contrib.otel.instrument()``).
"""
