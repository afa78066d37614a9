"""Independent references for the tests: NumPy/SciPy EM (:mod:`.em`), hidden Markov
models (:mod:`.hmm`) and the brute-force enumeration of tiny models
(:mod:`.brute_force`). None imports ``pm_em``."""
