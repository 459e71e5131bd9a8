"""The cron service: the actors that run the pure cron core against the database.

Internal: import the public API from :mod:`kongtask`; these modules may change.
"""
