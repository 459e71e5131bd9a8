"""The database: statements, connecting, migrations and the embedded server.

Internal: import the public API from :mod:`kongtask`; these modules may change.
"""
