"""EM over data in chunks: statistics that add up over chunks of the observations,
computed in-process or on Dask workers, and an M-step on their totals."""
