"""Datasets: long-tailed views of data that ships with packages or lies on disk."""
