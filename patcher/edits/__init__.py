"""Edit kinds: each computes a weight delta at one layer (rank-one, silencing, CARE, ...)."""
