"""The E-step's graphs: enumeration tables, stand-ins, forward-backward Ops, pointwise
log-likelihood."""
