"""iothub: MQTT telemetry into PostgreSQL with a rule engine."""
