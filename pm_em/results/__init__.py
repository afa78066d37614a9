"""What a fit returns: InferenceData, criteria, Laplace, comparison with MCMC, plots."""
