"""The rule engine: condition and action models, safe templates, the evaluation state machine."""
