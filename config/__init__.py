"""Configuration: one settings model, loaded once in `main()` and passed down."""
