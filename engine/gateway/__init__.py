"""moefleet gateway: OpenAI-compatible routing to engine groups (schema: moefleet.gateway_schema)."""
