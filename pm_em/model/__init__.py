"""The model as EM sees it: mixture rewriting, graph analysis, latents, Markov chains,
location parameters, data binding."""
