"""Balancing methods; each module registers its class."""
