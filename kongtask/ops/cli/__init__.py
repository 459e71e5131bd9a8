"""The ``kongtask`` command line.

Internal: import the public API from :mod:`kongtask`; these modules may change.
"""
