"""moefleet: Kubernetes-native serving of very large Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
