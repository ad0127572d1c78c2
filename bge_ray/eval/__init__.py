"""Evaluation: dataset loaders, retrieval over the shared index code, pytrec_eval metrics."""
