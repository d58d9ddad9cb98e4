"""Data on disk and in the database: poses, prompts and poses of a round, the samples folder, the schema, locks."""
