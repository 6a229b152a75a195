"""Serving-time adapter residency: which validated adapter versions are on the generator, and their leases."""
