"""Loading models: hub ids, folders, single files, the embedded default, exported policies' file names."""
