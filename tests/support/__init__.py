"""Test support: real PostgreSQL and Mosquitto servers for the suite."""
