"""The ground floor every stage stands on: errors, settings, the data-dir layout, atomic writes, records, the prompt contract."""
