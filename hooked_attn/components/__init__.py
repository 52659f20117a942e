"""Model components: one concept per file, configured by features, never by model names."""
