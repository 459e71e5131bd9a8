"""``manage.py kongtask_worker``."""
