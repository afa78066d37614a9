"""The M-step's graphs: E-step results as inputs, the shared term context, the numeric
objective, closed-form rules."""
