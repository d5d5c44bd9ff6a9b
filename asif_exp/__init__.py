"""ASIF: coupled data turns unimodal models into a multimodal one without training."""

from asif_exp import allocator

allocator.one_arena()  # before any thread starts: see asif_exp/allocator.py
