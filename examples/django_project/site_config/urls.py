"""The example's URLs: kongtask's dashboard under /kongtask/, for staff users."""

from django.urls import include, path

urlpatterns = [path("kongtask/", include("kongtask.contrib.django.urls"))]
