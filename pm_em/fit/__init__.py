"""Running EM: state, loop, SQUAREM, precision, degenerate solutions, starts, progress."""
