"""`moefleet bench`: offline throughput of the engine's model path on random weights, for named presets."""
