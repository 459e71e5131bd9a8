"""The job path: claiming, running and completing jobs, and pool health.

Internal: import the public API from :mod:`kongtask`; these modules may change.
"""
