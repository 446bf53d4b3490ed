"""Local infrastructure for the embedded single-machine setup (Kafka-protocol broker, topics)."""
