"""What the example's task writes."""

from django.db import models


class Greeting(models.Model):
    """One greeting recorded by the ``greet`` task."""

    name = models.CharField(max_length=100)
    attempt = models.IntegerField(default=1)
