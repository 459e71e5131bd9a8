"""Operations: status, health, metrics, the dashboard, logs and the command line.

Internal: import the public API from :mod:`kongtask`; these modules may change.
"""
