"""``lorag eval``: retrieval, answer, citation and perplexity metrics for base, RAG, adapter and RAG + adapter."""
