"""Scaling laws: sweeps of small runs (`sweep`), their results table (`results`), and the fits
(`fit`: Chinchilla law, compute-optimal allocation, IsoFLOP profiles, D-CPT mixture law, plots).
"""
