"""MQTT intake: topic matching, payload validation and the batch writer into PostgreSQL."""
