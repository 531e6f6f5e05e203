"""The data layer: embedded corpus, vocabularies and the batch pipeline. Never imports the model."""
