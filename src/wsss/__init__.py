"""wsss: weakly supervised semantic segmentation, the three-step method of "NoPeopleAllowed"."""

__version__ = "0.1.0"
