"""Shared pytest configuration. Fixtures for areas live in tests/<area>/conftest.py and tests/support/."""

# The Kubernetes control plane / Prometheus fixtures (kube_cluster, kube_namespace, prometheus) are used by
# tests/cluster/ and tests/operator/, so they are registered for the whole suite. Importing the plugin is
# cheap: nothing starts until a test asks for a fixture.
pytest_plugins = ["support.cluster_fixtures"]
