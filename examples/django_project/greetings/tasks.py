"""The example's Django tasks, run by ``manage.py kongtask_worker``."""

try:  # Django 6
    from django.tasks import task
except ImportError:  # Django 5.2 with the django-tasks backport
    from django_tasks import task

from greetings.models import Greeting


@task(takes_context=True)
def greet(context, name):
    """Record a greeting for ``name`` (and which attempt ran it)."""
    Greeting.objects.create(name=name, attempt=context.attempt)


@task(priority=10, queue_name="mail")
async def greet_async(name):
    """An async task: records its greeting through the ORM's async API."""
    await Greeting.objects.acreate(name=name)


@task()
def refuse(name):
    """A task that always fails (its job is retried later, up to its attempts)."""
    raise RuntimeError(f"no greeting for {name}")
