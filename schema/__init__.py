"""The database: versioned SQL migrations, named queries, TimescaleDB setup."""
