"""``path("kongtask/", include("kongtask.contrib.django.urls"))`` mounts the dashboard."""

from __future__ import annotations

from django.urls import re_path

from kongtask.contrib.django.views import dashboard

app_name = "kongtask"

urlpatterns = [re_path(r"^(?P<path>.*)$", dashboard, name="dashboard")]
