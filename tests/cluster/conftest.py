"""tests/cluster: acceptance tests of the local Kubernetes control plane (tests/support/controlplane.py).

The fixtures (kube_cluster, kube_namespace, prometheus) come from support.cluster_fixtures, registered in
tests/conftest.py so tests/operator/ can use them too. Every module here sets `pytestmark = cluster`.
"""
