"""Statistical studies of the certification procedures (samples, agreement, radius), not of speed.

``python -m training.studies.sample_efficiency`` runs the shipped models; ``bound_sim`` and ``futility_sim``
simulate the procedures on the fixed-n reference images' p_A (binomial draws, no model).
"""
