"""Post-hoc attribution: which retrieved passages support each answer sentence, and when to decline."""
