"""Data the project generates or finds on the machine: modular arithmetic, spiked covariance, text corpora."""
