"""Tenant indexes in PostgreSQL with pgvector: the shared store several server replicas read and write."""
